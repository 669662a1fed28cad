"""The HEADKV backend without compression serves exactly what stock vLLM serves."""

import pytest

from conftest import run_llm

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.\n",
    "def fibonacci(n):",
    "In 1969, the first humans to walk on the Moon were",
    "List three prime numbers greater than 100:",
    "Translate to French: Good morning, how are you?",
]


@pytest.mark.slow
def test_greedy_outputs_equal_stock_vllm(model_dir):
    engine = dict(
        model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=1024,
        gpu_memory_utilization=0.3, seed=0, max_num_seqs=8,
    )
    sampling = dict(temperature=0.0, max_tokens=32, ignore_eos=True)
    stock = run_llm({"engine": engine, "prompts": PROMPTS, "sampling": sampling})
    headkv = run_llm({"engine": {**engine, "attention_backend": "headkv"}, "prompts": PROMPTS, "sampling": sampling})
    assert all(len(t) == 32 for t in stock["token_ids"])
    assert headkv["token_ids"] == stock["token_ids"]
