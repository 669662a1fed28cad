"""Run by scripts/gpu_check.sh only (it names this file in TEST_FILES; the suite does not
collect it, its name not being test_*.py): under the script, the tests import
headkv_vllm, its kernels and its score files from the package the script assembles,
not from the source tree's headkv_vllm/ (which has neither kernels nor configs), and
cannot import vLLM."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_tests_import_the_assembled_package():
    import headkv_vllm
    import headkv_vllm.configs
    import headkv_vllm.kernels
    from headkv_vllm.core.page_store import BlockTablePageStore
    from headkv_vllm.method import scores

    if "GPU_CHECK_PACKAGE" not in os.environ:
        pytest.fail("GPU_CHECK_PACKAGE is not set: run this file through scripts/gpu_check.sh", pytrace=False)
    pkg = Path(os.environ["GPU_CHECK_PACKAGE"])
    assert Path(headkv_vllm.__file__).parent == pkg
    assert Path(headkv_vllm.kernels.__file__).parent == pkg / "kernels"
    assert Path(headkv_vllm.configs.__file__).parent == pkg / "configs"
    assert Path(sys.modules[BlockTablePageStore.__module__].__file__).parent == pkg / "core"
    assert scores.CONFIG_DIR == pkg / "configs" and scores.available_score_files()
    assert str(ROOT) not in sys.path and "" not in sys.path
    with pytest.raises(ImportError):
        import vllm  # noqa: F401
