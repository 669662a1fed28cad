import json
import os
import random
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
# vLLM's CPU platform gives even a one-worker engine its own worker process, which
# polls for work on one of the two cores; on CUDA a one-GPU engine runs its worker in
# the engine-core process. The tests take the CUDA layout, which starts and runs an
# engine in about half the time here; `vllm serve` keeps its API and engine-core processes.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from support.engines import MODEL_DIR, SMOL


def pytest_addoption(parser):
    parser.addoption(
        "--gpu-shapes", default="auto",
        help="the scenarios of tests/gpu/test_step_harness.py: auto (full on CUDA, tiny otherwise), tiny, "
        "full (small and Llama-3-8B attention) or shape names, comma-separated (tests/support/step_scenario.py)")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (MODEL_DIR / "config.json").exists():
        pytest.fail(f"{MODEL_DIR} is missing: run `bash scripts/setup.sh` first", pytrace=False)
    return MODEL_DIR


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="session")
def haystack_ids(tokenizer):
    from headkv_vllm.tools.common.haystack import haystack_text

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
