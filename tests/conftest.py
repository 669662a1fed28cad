import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the kernel tests run the Triton kernels in Triton's interpreter.
    # triton.jit reads the flag when a kernel is defined, i.e. when any test module
    # first imports headkv_vllm.kernels, so it must be set before collection.
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (MODEL_DIR / "config.json").exists():
        pytest.fail(f"{MODEL_DIR} is missing: run `bash scripts/setup.sh` first", pytrace=False)
    return MODEL_DIR


def run_llm(spec: dict, timeout: float = 600) -> dict:
    """Run ``tests/llm_runner.py`` (a real ``vllm.LLM``) in a fresh process and
    return its JSON result. A fresh process per engine keeps tests independent."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "llm_runner.py")],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise AssertionError(f"llm_runner failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("LLM_RUNNER_RESULT "))
    return json.loads(line.split(" ", 1)[1])
