"""The GPU check's parts on this machine: scripts/gpu_step_check.py (HeadKV steps
through the compute core vs the fp32 reference route and an independent oracle) on
this machine's device, with the Triton kernels (in Triton's interpreter without a
GPU); that it fails broken page stores; scripts/gpu_check.sh's refusal without CUDA
and its CPU dry run; scripts/gpu_check_report.py's commit lookup without git."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from headkv_vllm.core.attention import HeadAttention
from headkv_vllm.core.page_store import BlockTablePageStore

ROOT = Path(__file__).resolve().parents[2]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load("gpu_step_check")
report = _load("gpu_check_report")

COVERED = [  # every kind of row and both page checks ran
    "output_prompt_vs_reference", "output_recomputed_vs_reference", "output_decode_vs_reference",
    "scores_vs_reference", "pages_vs_reference", "reference_prompt_vs_oracle", "reference_recomputed_vs_oracle",
    "reference_decode_vs_oracle", "reference_pages_vs_oracle", "plan_lengths_vs_oracle", "padding_rows_untouched",
]


def test_step_check_passes_with_the_triton_kernels():
    result = check.run(DEVICE, ["tiny"], ["float32", "bfloat16"], timing=False, log=lambda *_: None)
    assert result["pass"], json.dumps(result["cases"], indent=1)[:6000]
    for case in result["cases"]:
        assert case["kernels"] == "triton"
        for name in COVERED:
            assert case["checks"][name]["count"] > 0, name
        if DEVICE.type == "cuda":
            assert case["checks"]["no_host_sync_in_forward"]["pass"]
            assert case["checks"]["no_host_sync_in_plan"]["pass"]  # pinned, non-blocking, as the engine
    assert result["cases"][0]["checks"]["output_decode_vs_reference"]["max_abs_err"] <= 1e-4  # fp32


class SkipsAppend(BlockTablePageStore):
    def append_decode(self, state, k, v, pages):
        pass  # decode tokens never reach the pages


class KeepsLowestScores(BlockTablePageStore):
    def store_prefill(self, state, pf, scores, k, v, pages):
        super().store_prefill(state, pf, -scores, k, v, pages)


class DecodeMissesNewestToken(BlockTablePageStore):
    def attend_decode(self, state, q, pages, scale):
        state = dataclasses.replace(state, decode_lengths=state.decode_lengths - 1)
        return super().attend_decode(state, q, pages, scale)


@pytest.mark.parametrize("store,fails", [
    (SkipsAppend, {"pages_vs_reference", "output_decode_vs_reference"}),
    (KeepsLowestScores, {"pages_vs_reference", "output_decode_vs_reference", "output_recomputed_vs_reference"}),
    (DecodeMissesNewestToken, {"output_decode_vs_reference"}),
])
def test_step_check_fails_a_broken_store(store, fails):
    kernels = "triton" if DEVICE.type == "cuda" else "reference"  # the interpreter is slow; the store is what differs
    result = check.run(DEVICE, ["tiny"], ["float32"], kernels, timing=False, store_factory=store, log=lambda *_: None)
    assert not result["pass"]
    (case,) = result["cases"]
    failed = {name for name, c in case["checks"].items() if not c["pass"]}
    assert failed == fails, failed
    assert all("first_failure" in case["checks"][name] for name in fails)


def test_padded_rows_always_pad():
    assert [check.padded_rows(n) for n in (1, 7, 8, 9, 16)] == [11, 11, 11, 19, 19]


def test_step_check_fails_a_forward_that_writes_padding_rows(monkeypatch):
    """q/k/v/output come padded as under CUDA graphs: the rows past num_actual_tokens must stay untouched."""
    forward = HeadAttention.forward

    def spills(self, step, query, key, value, pages, output):
        forward(self, step, query, key, value, pages, output)
        output[step.plan.num_actual_tokens:] = 0  # as a kernel launched over every row would
        return output

    monkeypatch.setattr(HeadAttention, "forward", spills)
    kernels = "triton" if DEVICE.type == "cuda" else "reference"
    result = check.run(DEVICE, ["tiny"], ["float32"], kernels, timing=False, log=lambda *_: None)
    (case,) = result["cases"]
    assert not result["pass"]
    assert {name for name, c in case["checks"].items() if not c["pass"]} == {"padding_rows_untouched"}


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the sync guard is CUDA's")
def test_step_check_fails_a_host_sync_in_the_forward():
    class Syncs(BlockTablePageStore):
        def attend_decode(self, state, q, pages, scale):
            int(state.decode_lengths.max())
            return super().attend_decode(state, q, pages, scale)

    assert check.sync_guard_works(DEVICE)
    result = check.run(DEVICE, ["tiny"], ["float32"], timing=False, store_factory=Syncs, log=lambda *_: None)
    (case,) = result["cases"]
    assert not case["pass"] and not case["checks"]["no_host_sync_in_forward"]["pass"]


def test_compare_bounds_errors_and_fails_nan():
    expect = torch.tensor([1.0, -2.0, 0.0])
    assert check.compare(expect + 1e-5, expect, atol=2e-5, rtol=0)["pass"]
    worse = check.compare(expect + torch.tensor([0, 1e-3, 0]), expect, atol=2e-5, rtol=1e-4)
    assert not worse["pass"] and worse["bad"] == 1 and worse["max_abs_err"] == pytest.approx(1e-3, rel=1e-3)
    assert not check.compare(torch.tensor([1.0, float("nan"), 0.0]), expect, atol=1, rtol=1)["pass"]
    assert not check.compare(expect[:2], expect, atol=1, rtol=1)["pass"]
    assert not check.compare_exact(expect.bfloat16(), expect + 1e-3)["pass"]


SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.skipif(DEVICE.type == "cuda", reason="refuses only without CUDA")
def test_gpu_check_refuses_without_cuda(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_RESULTS=str(tmp_path))
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 3
    assert "no CUDA device" in proc.stderr and "--cpu-dry-run" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif("GPU_CHECK_PACKAGE" not in os.environ, reason="runs inside scripts/gpu_check.sh")
def test_inside_gpu_check_tests_import_the_assembled_package():
    """Under scripts/gpu_check.sh the tests import headkv_vllm, its kernels and its score
    files from the package the script assembles, not from the source tree's headkv_vllm/
    (which has neither kernels nor configs), and cannot import vLLM."""
    import headkv_vllm
    import headkv_vllm.configs
    import headkv_vllm.kernels
    from headkv_vllm.method import scores

    pkg = Path(os.environ["GPU_CHECK_PACKAGE"])
    assert Path(headkv_vllm.__file__).parent == pkg
    assert Path(headkv_vllm.kernels.__file__).parent == pkg / "kernels"
    assert Path(headkv_vllm.configs.__file__).parent == pkg / "configs"
    assert Path(sys.modules[BlockTablePageStore.__module__].__file__).parent == pkg / "core"
    assert scores.CONFIG_DIR == pkg / "configs" and scores.available_score_files()
    assert str(ROOT) not in sys.path and "" not in sys.path
    with pytest.raises(ImportError):
        import vllm  # noqa: F401


def bare_env() -> dict:
    return dict({k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, PYTHONNOUSERSITE="1")


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """An interpreter like the GPU machine's: torch, triton and pytest, but headkv_vllm not
    installed (tests/support/bare_venv.py)."""
    from support.bare_venv import make_bare_venv

    venv = tmp_path_factory.mktemp("bare") / "venv"
    python, _ = make_bare_venv(venv)
    probe = subprocess.run(
        [str(python), "-c", "import importlib.util, sys, torch, triton, pytest; "
         "print(importlib.util.find_spec('headkv_vllm'), [f for f in sys.meta_path if 'editable' in repr(f)])"],
        capture_output=True, text=True, env=bare_env(), cwd=venv, timeout=120)
    assert probe.stdout.split() == ["None", "[]"], probe.stdout + probe.stderr
    return str(python)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the dry run is for machines without CUDA")
@pytest.mark.skipif("GPU_CHECK_PACKAGE" in os.environ, reason="already inside scripts/gpu_check.sh")
def test_gpu_check_cpu_dry_run_writes_its_json(tmp_path, bare_python):
    # Run by an interpreter without the package installed, as on the GPU machine: the
    # script must import headkv_vllm (kernels and configs included) from the source tree.
    out = tmp_path / "out"
    env = dict(bare_env(), PYTHON=bare_python, OUT=str(out), GPU_CHECK_RESULTS=str(tmp_path / "results"),
               GPU_CHECK_COMMIT="f" * 40, GPU_CHECK_TESTS="tests/core/test_step_plan.py "
               "tests/gpu/test_gpu_step_check.py::test_inside_gpu_check_tests_import_the_assembled_package")
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run"], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (written,) = (tmp_path / "results").glob("gpu_check_cpu-dry-run_*.json")
    assert (out / written.name).read_bytes() == written.read_bytes()
    assert list(out.glob("gpu_check_logs_*/step_check.log"))
    result = json.loads(written.read_text())
    assert result["pass"] and result["dry_run"] and result["command"] == "bash scripts/gpu_check.sh --cpu-dry-run"
    tests = result["parts"]["kernel_tests"]
    assert tests["files"]["tests/core/test_step_plan.py"]["passed"] > 0
    assert tests["files"]["tests/gpu/test_gpu_step_check.py"]["passed"] == 1  # not skipped: the tests' imports
    assert tests["passed"] == tests["tests"]
    cases = result["parts"]["step_check"]["result"]["cases"]
    assert [(c["shape"]["name"], c["dtype"], c["pass"]) for c in cases] == [("tiny", "float32", True),
                                                                            ("tiny", "bfloat16", True)]
    assert result["parts"]["bench_quick"]["skipped"]
    assert {"python", "torch", "triton", "device"} <= set(result["machine"])
    assert result["git"]["commit"] == "f" * 40 and result["git"]["source"] == "GPU_CHECK_COMMIT"


def test_commit_read_from_the_git_folder(tmp_path):
    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    assert report.read_git_head(git) is None
    (git / "packed-refs").write_text("# pack-refs with: peeled\n" + "a" * 40 + " refs/heads/main\n")
    assert report.read_git_head(git) == "a" * 40
    (git / "refs" / "heads" / "main").write_text("b" * 40 + "\n")
    assert report.read_git_head(git) == "b" * 40
    (git / "HEAD").write_text("c" * 40 + "\n")  # detached
    assert report.read_git_head(git) == "c" * 40
    assert report.read_git_head(tmp_path / "absent") is None
    assert report.git_commit(tmp_path, environ={})["commit"] == "c" * 40  # not a git work tree: read by hand


def test_commit_from_the_callers_environment(tmp_path):
    """A copy without .git: the commit the caller passes in GPU_CHECK_COMMIT; with a .git
    that disagrees, the caller's is recorded and the tree's kept beside it."""
    assert report.git_commit(tmp_path, environ={})["commit"] is None
    given = report.git_commit(tmp_path, environ={"GPU_CHECK_COMMIT": " " + "d" * 40 + "\n"})
    assert given == {"commit": "d" * 40, "source": "GPU_CHECK_COMMIT", "modified_tracked_files": None}
    assert report.git_commit(tmp_path, environ={"GPU_CHECK_COMMIT": ""})["source"] == "no .git"
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("e" * 40 + "\n")
    assert report.git_commit(tmp_path, environ={"GPU_CHECK_COMMIT": "d" * 40})["tree_commit"] == "e" * 40
    assert "tree_commit" not in report.git_commit(tmp_path, environ={"GPU_CHECK_COMMIT": "e" * 40})
