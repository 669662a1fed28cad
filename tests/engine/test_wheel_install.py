"""The wheel holds everything the plugin needs: built from exactly what the Dockerfile copies,
installed non-editable where the source tree is not importable, it serves the default policy
('headkv') with a score file shipped inside the installed package."""

import json
import os
import re
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

from support.engines import ROOT, engine
from headkv_vllm.method.scores import find_score_file, identity_from_hf_config

DOCKERFILE = ROOT / "Dockerfile"


def dockerfile_build_stage() -> tuple[str, list[tuple[list[str], str]]]:
    """The folder the Dockerfile's ``pip wheel`` builds and its ``COPY`` lines from the build
    context into it: (sources, destination)."""
    text = DOCKERFILE.read_text()
    root = re.search(r"^RUN python3 -m pip wheel .*--no-deps .*-w \S+ (\S+)$", text, re.M).group(1)
    copies = [(w[1:-1], w[-1]) for w in (l.split() for l in text.splitlines())
              if w[:1] == ["COPY"] and not w[1].startswith("--from")]
    return root, copies


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The wheel built as the Dockerfile's build stage builds it, from a copy of exactly the files
    the Dockerfile copies, so a file the package needs that the image leaves out fails here too."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    root, copies = dockerfile_build_stage()
    for sources, dest in copies:
        where = src / Path(dest).relative_to(root)
        for name in sources:
            target = where / name if dest.endswith("/") else where
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, target)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-index", "--no-deps",
         "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (path,) = (tmp / "dist").glob("headkv_vllm-*.whl")
    return path


def test_dockerfile_default_model_has_a_shipped_score_file(wheel, model_dir):
    """The image's default MODEL, served with the default policy, finds a score file in the wheel."""
    text = DOCKERFILE.read_text()
    model = re.search(r"^ENV MODEL=(\S+)", text, re.M).group(1)
    config = types.SimpleNamespace(**json.loads((model_dir / "config.json").read_text()))
    assert Path(model).name == model_dir.name, "the local model is not the image's default"
    # the name the engine gives the model: the last part of what is served (settings.headkv_from_vllm_config)
    found = find_score_file(identity_from_hf_config(config, Path(model).name))
    assert found is not None, f"no score file for {model}"
    names = zipfile.ZipFile(wheel).namelist()
    assert f"headkv_vllm/configs/{found.name}" in names, sorted(n for n in names if "configs" in n)
    assert "headkv_vllm/kernels/__init__.py" in names
    # the served image installs that wheel, without touching its vLLM
    assert re.search(r"^RUN python3 -m pip install .*--no-deps \S+/headkv_vllm-\*\.whl", text, re.M)


ENGINE_SCRIPT = r'''
import importlib.metadata, json, sys


def main():  # under __main__: vLLM starts its engine process with spawn, which re-imports this file
    import headkv_vllm
    from headkv_vllm.method import scores
    proof = {"package": headkv_vllm.__file__, "config_dir": str(scores.CONFIG_DIR),
             "score_files": scores.available_score_files(), "sys_path": sys.path,
             "dist": str(importlib.metadata.distribution("headkv-vllm").locate_file("")),
             "editable_finders": [repr(f) for f in sys.meta_path if "editable" in repr(f).lower()]}
    print("PROOF " + json.dumps(proof), flush=True)
    from vllm import LLM, SamplingParams
    llm = LLM(**json.loads(sys.argv[1]))
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    print("TOKENS " + json.dumps(list(out[0].outputs[0].token_ids)), flush=True)


if __name__ == "__main__":
    main()
'''


@pytest.mark.slow
def test_engine_from_installed_wheel_uses_shipped_scores(wheel, model_dir, tmp_path):
    # A fresh interpreter environment (tests/support/bare_venv.py: without the editable install) that
    # sees the wheel, installed with pip --target into its site-packages, and after it the test
    # environment's site-packages for vLLM and torch.
    from support.bare_venv import make_bare_venv

    python, site = make_bare_venv(tmp_path / "venv")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-index", "--no-deps",
         "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = tmp_path / "cwd"  # outside the repository
    run_dir.mkdir()
    (run_dir / "engine.py").write_text(ENGINE_SCRIPT)

    kw = {**engine(model_dir), "attention_backend": "HEADKV"}  # no settings: the default policy 'headkv'
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONUNBUFFERED="1", PYTHONNOUSERSITE="1")
    proc = subprocess.run([str(python), "engine.py", json.dumps(kw)], cwd=run_dir, env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    proof = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("PROOF ")).split(" ", 1)[1])
    installed = site / "headkv_vllm"
    assert Path(proof["package"]) == installed / "__init__.py"
    assert Path(proof["config_dir"]) == installed / "configs"
    assert Path(proof["dist"]) == site
    assert not proof["editable_finders"]
    # the only folder on sys.path holding a headkv_vllm package is the new install
    assert [p for p in proof["sys_path"] if (Path(p or ".") / "headkv_vllm").exists()] == [str(site)]
    shipped = installed / "configs" / "SmolLM2-135M-Instruct_R2.json"
    assert str(shipped) in proof["score_files"]

    tokens = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("TOKENS ")).split(" ", 1)[1])
    assert len(tokens) == 4
    # the worker's start-up line names where the budgets came from
    started = [l for l in log.splitlines() if "HeadKV: policy=headkv" in l]
    assert started and all(f"from scores {shipped} (probe R2)" in l for l in started), started or log[-6000:]
