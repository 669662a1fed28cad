"""scripts/gpu_check.sh from the outside: its refusal without CUDA, its CPU dry run
(run by an interpreter without the package installed, as on the GPU machine), and
scripts/gpu_check_report.py's commit lookup without git. What the script runs inside
is tests/gpu/test_step_harness.py, tests/gpu/inside_gpu_check.py and the other files of
its TEST_FILES."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_check_report", ROOT / "scripts" / "gpu_check_report.py")
report = sys.modules["gpu_check_report"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_gpu_check_refuses_without_cuda(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_RESULTS=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 3
    assert "no CUDA device" in proc.stderr and "--cpu-dry-run" in proc.stderr
    assert not list(tmp_path.iterdir())


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


# A scenario of the step harness, the tests' imports under the script, and a plain test file.
DRY_RUN_TESTS = ("tests/core/test_step_plan.py tests/gpu/inside_gpu_check.py "
                 "tests/gpu/test_step_harness.py::test_outputs_match_the_reference_route[tiny-float32]")


def test_gpu_check_cpu_dry_run_writes_its_json(tmp_path, bare_python):
    # Run by an interpreter without the package installed, as on the GPU machine: the
    # script must import headkv_vllm (kernels and configs included) from the source tree.
    # The script hides any GPU itself (CUDA_VISIBLE_DEVICES="").
    out = tmp_path / "out"
    env = dict(bare_env(), PYTHON=bare_python, OUT=str(out), GPU_CHECK_RESULTS=str(tmp_path / "results"),
               GPU_CHECK_COMMIT="f" * 40, GPU_CHECK_TESTS=DRY_RUN_TESTS)
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run"], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (written,) = (tmp_path / "results").glob("gpu_check_cpu-dry-run_*.json")
    assert (out / written.name).read_bytes() == written.read_bytes()
    assert list(out.glob("gpu_check_logs_*/bench_decode_step.log"))
    result = json.loads(written.read_text())
    assert result["pass"] and result["dry_run"] and result["command"] == "bash scripts/gpu_check.sh --cpu-dry-run"
    assert result["format"] == "headkv-gpu-check/2" and set(result["parts"]) == {"tests", "step_bench", "bench_quick"}
    tests = result["parts"]["tests"]
    assert tests["files"]["tests/core/test_step_plan.py"]["passed"] > 0
    assert tests["files"]["tests/gpu/inside_gpu_check.py"]["passed"] == 1  # the tests' imports
    assert tests["files"]["tests/gpu/test_step_harness.py"]["passed"] == 1  # the tiny scenario, one test id
    assert tests["passed"] == tests["tests"]
    bench = result["parts"]["step_bench"]
    assert bench["pass"] and bench["result"]["device"] == "cpu" and bench["result"]["kernels"] == "reference"
    assert bench["result"]["rows"] and all(row["ms_per_layer"] > 0 for row in bench["result"]["rows"])
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
