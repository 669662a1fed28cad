"""The README and docs/ link only to files that exist, and every repository path that a
doc or a source file cites (``docs/method.md``, ``scripts/setup.sh``, ...) exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("headkv_vllm", "kernels", "configs", "scripts", "tests", "docs", "results", ".ci")
# A repository path as prose cites it: a top folder, then names; globs and <placeholders> allowed.
CITED = re.compile(r"(?<![\w./-])((?:%s)/[\w*<>.{}/-]*[\w*>}])" % "|".join(re.escape(t) for t in TOP))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SOURCES = sorted(p for pattern in ("headkv_vllm/**/*.py", "kernels/*.py", "scripts/*", "tests/**/*.py", ".ci/*")
                 for p in ROOT.glob(pattern) if p.is_file() and "__pycache__" not in p.parts) + \
    [ROOT / "Dockerfile", ROOT / "setup.py"]


def exists(cited: str) -> bool:
    """Whether a cited path names something in the tree: a glob or a <placeholder> must match,
    a module may be cited without ``.py``, and the installed ``headkv_vllm/kernels`` and
    ``headkv_vllm/configs`` are the tree's ``kernels/`` and ``configs/`` (setup.py)."""
    pattern = re.sub(r"<[^>]*>|\{[^}]*\}", "*", cited.rstrip("/."))
    pattern = re.sub(r"^headkv_vllm/(kernels|configs)\b", r"\1", pattern)
    if "*" in pattern:
        return any(ROOT.glob(pattern))
    return (ROOT / pattern).exists() or (ROOT / f"{pattern}.py").exists()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_links_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"


@pytest.mark.parametrize("path", DOCS + SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_paths_exist(path):
    cited = set(CITED.findall(path.read_text(errors="replace")))
    if path in SOURCES:  # a tool's default output folder under results/ appears when it runs
        cited = {c for c in cited if not c.startswith("results/")}
    missing = sorted(c for c in cited if not exists(c))
    assert not missing, f"{path.relative_to(ROOT)} cites paths that are not in the repository: {missing}"


def test_docs_the_readme_promises_exist():
    for name in ("method", "results", "gpu", "operations", "kv_layout"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), f"docs/{name}.md is missing"


def test_readme_is_a_short_page():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 300, f"README.md has {lines} lines; keep it a user's page of at most 300 (details go to docs/)"
