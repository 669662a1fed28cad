"""What the engine tests share: the repository root, the default model, and a real
``vllm.LLM`` run in a fresh process (``tests/support/llm_runner.py`` and the other
``*_probe.py`` scripts beside it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from headkv_vllm.method.scores import ModelIdentity

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"
SMOL = ModelIdentity("SmolLM2-135M-Instruct", 30, 9, 3, 64)


def run_engine_script(script: str, spec: dict, timeout: float = 900) -> dict:
    """Run ``tests/support/<script>`` (a real ``vllm.LLM``) in a fresh process with ``spec``
    on stdin and return the JSON it prints after its ``<NAME>_RESULT`` marker.
    A fresh process per engine keeps tests independent."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "support" / script)],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    marker = Path(script).stem.upper() + "_RESULT "
    line = next(l for l in proc.stdout.splitlines() if l.startswith(marker))
    return json.loads(line.split(" ", 1)[1])


def run_llm(spec: dict, timeout: float = 900) -> dict:
    return run_engine_script("llm_runner.py", spec, timeout)


def engine(model_dir, **headkv):
    """LLM kwargs for SmolLM2 on the CPU; HEADKV with ``headkv`` settings when given."""
    # A fixed 1 GiB cache: vLLM allocates and zeroes the CPU pool at start-up, and the
    # default (30% of RAM) took 13 s of every engine's start.
    kw = dict(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=4096,
              kv_cache_memory_bytes=2**30, seed=0, max_num_seqs=8)
    if headkv:
        kw.update(attention_backend="headkv", additional_config={"headkv": headkv})
    return kw
