import json
import os
import random
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

# The engines and servers the tests start inherit this: vLLM's CPU worker would bind
# its threads to one core and leave the other idle on a 2-core machine (the tests run
# one engine at a time, so every core the process may use goes to it).
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0)))))

from headkv_vllm.method.scores import ModelIdentity

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"
SMOL = ModelIdentity("SmolLM2-135M-Instruct", 30, 9, 3, 64)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (MODEL_DIR / "config.json").exists():
        pytest.fail(f"{MODEL_DIR} is missing: run `bash scripts/setup.sh` first", pytrace=False)
    return MODEL_DIR


def run_engine_script(script: str, spec: dict, timeout: float = 900) -> dict:
    """Run ``tests/<script>`` (a real ``vllm.LLM``) in a fresh process with ``spec``
    on stdin and return the JSON it prints after its ``<NAME>_RESULT`` marker.
    A fresh process per engine keeps tests independent."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / script)],
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


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="session")
def haystack_ids(tokenizer):
    from headkv_vllm.tools.haystack import haystack_text

    return tokenizer(haystack_text()[:400000])["input_ids"]


@pytest.fixture(scope="session")
def skewed_scores(tmp_path_factory):
    """Synthetic, strongly skewed head scores (half the heads 0, a heavy tail): harsher
    than the committed SmolLM2 scores, so budgets range from 10 to ~1750 tokens."""
    rng = random.Random(0)
    scores = [[rng.paretovariate(1.2) if rng.random() < 0.5 else 0.0 for _ in range(3)] for _ in range(30)]
    path = tmp_path_factory.mktemp("scores") / "smollm2-synthetic.json"
    path.write_text(json.dumps({
        "format": "headkv-scores/1",
        "model": {"name": SMOL.name, "num_layers": 30, "num_query_heads": 9, "num_kv_heads": 3, "head_dim": 64},
        "probe": "synthetic", "kv_aggregation": "sum", "kv_head_scores": scores, "trials": 0, "command": "test",
    }))
    return str(path)


def engine(model_dir, **headkv):
    """LLM kwargs for SmolLM2 on the CPU; HEADKV with ``headkv`` settings when given."""
    # A fixed 1 GiB cache: vLLM allocates and zeroes the CPU pool at start-up, and the
    # default (30% of RAM) took 13 s of every engine's start.
    kw = dict(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=4096,
              kv_cache_memory_bytes=2**30, seed=0, max_num_seqs=8)
    if headkv:
        kw.update(attention_backend="headkv", additional_config={"headkv": headkv})
    return kw
