"""HEADKV in the real engine against stock vLLM (no compression) and against the
independent reference (compression), on SmolLM2 in float32."""

import os

import pytest

from support.engines import SMOL, engine, run_llm
from headkv_vllm.method.config import HeadKVConfig
from headkv_vllm.engine.settings import resolve_budget_rule, resolve_budgets


@pytest.mark.slow
def test_no_compression_equals_stock(model_dir, haystack_ids, skewed_scores):
    prompts = [haystack_ids[s : s + n] for s, n in [(0, 37), (500, 300), (2000, 1100), (9000, 9), (4000, 700)]]
    sampling = dict(temperature=0.0, max_tokens=24, ignore_eos=True)
    stock = run_llm({"engine": engine(model_dir), "prompts": prompts, "sampling": sampling})
    for cfg in ({"policy": "snapkv", "kv_size": 2048}, {"policy": "headkv", "kv_size": 2048, "scores": skewed_scores}):
        # headkv: the smallest head budget is >= every prompt here
        budgets, _ = resolve_budgets(HeadKVConfig.from_mapping(cfg), SMOL)
        assert budgets.summary()["min"] >= max(map(len, prompts)) or cfg["policy"] == "headkv"
        out = run_llm({"engine": engine(model_dir, **cfg), "prompts": prompts, "sampling": sampling})
        if cfg["policy"] == "snapkv":
            assert out["token_ids"] == stock["token_ids"]
        else:
            # budgets skewed: the short prompts (< smallest budget) are uncompressed
            short = [i for i, p in enumerate(prompts) if len(p) <= budgets.summary()["min"]]
            assert short and [out["token_ids"][i] for i in short] == [stock["token_ids"][i] for i in short]


@pytest.fixture(scope="module")
def reference(model_dir):
    """One reference for all cases: it prefills each prompt once."""
    from headkv_vllm.reference import LlamaReference

    return LlamaReference(model_dir)


# Logprob tolerance: both sides are float32 and select the same tokens (ties of
# max-pooled scores go to the lower position); what remains is summation order.
LOGPROB_ATOL = 1e-3


@pytest.mark.slow
# Every policy at both sizes, in one engine each: the server's 128 and a request's own 64
# (SamplingParams.extra_args), sharing steps. Prompts in one step or in chunks of 256 and
# 512 tokens (docs/kv_layout.md, "Chunked prefill"). The 1030-token prompt's last chunk
# is 6 tokens under both chunk sizes, so two of its 8 window queries come from the chunk
# before; the 2800-token prompts are chunked while the first ones decode.
@pytest.mark.parametrize("policy, chunk", [("headkv", None), ("headkv", 512), ("snapkv", 256), ("pyramidkv", 256)])
def test_compressed_matches_reference(model_dir, haystack_ids, reference, policy, chunk):
    # headkv: the committed SmolLM2 R2 scores, found by the engine's default lookup
    cfg = {"policy": policy, "kv_size": 128}
    asks = [(haystack_ids[1000:2030], 64), (haystack_ids[12000:14800], 128),
            (haystack_ids[12000:14800], 64), (haystack_ids[1000:2030], 128)]
    steps = 16
    chunking = {"enable_chunked_prefill": True, "max_num_batched_tokens": chunk} if chunk else \
        {"max_num_batched_tokens": 4096}
    out = run_llm({"engine": {**engine(model_dir, **cfg), **chunking}, "prompts": [p for p, _ in asks],
                   "sampling": dict(temperature=0.0, max_tokens=steps, ignore_eos=True, logprobs=5),
                   "extra_args": [None if k == cfg["kv_size"] else {"headkv_kv_size": k} for _, k in asks]})
    rule, _ = resolve_budget_rule(HeadKVConfig.from_mapping(cfg), SMOL)
    for i, (prompt, kv_size) in enumerate(asks):
        budgets = rule.budgets(kv_size)
        kept = [list(row) for row in budgets.kept(len(prompt))]
        assert sum(map(sum, kept)) / (30 * 3) <= kv_size + 1  # compression really happened
        tokens, logprobs = reference.generate(prompt, kept, window=budgets.window, pool_kernel=7, steps=steps)
        assert out["token_ids"][i] == tokens, f"prompt {i} at KV {kv_size}: greedy tokens differ from the reference"
        for step in range(steps):
            for token, lp in out["logprobs"][i][step].items():
                assert abs(lp - float(logprobs[step][int(token)])) < LOGPROB_ATOL, (i, step, token)


def assert_same_outputs(route: dict, cpu: dict) -> None:
    """Same greedy tokens; logprobs of the top tokens both report within LOGPROB_ATOL."""
    assert route["token_ids"] == cpu["token_ids"]
    for i, (steps_a, steps_b) in enumerate(zip(route["logprobs"], cpu["logprobs"])):
        for step, (a, b) in enumerate(zip(steps_a, steps_b)):
            for token in a.keys() & b.keys():
                assert abs(a[token] - b[token]) < LOGPROB_ATOL, (i, step, token)


@pytest.mark.slow
def test_block_table_route_equals_cpu_route(model_dir, haystack_ids):
    """The CUDA route's wiring in the real engine: step plan -> block-table page store
    (the Triton kernels' PyTorch references on CPU tensors) -> pages, against the CPU
    route (vLLM's CPU ops) on the same compressed requests; the block-table route
    prefills in chunks of 256 tokens (rows with leading nulls), the CPU route in one step."""
    cfg = {"policy": "headkv", "kv_size": 64}
    prompts = [haystack_ids[0:700], haystack_ids[3000:4100], haystack_ids[8000:8030]]
    spec = {"prompts": prompts, "sampling": dict(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5)}
    cpu = run_llm({"engine": {**engine(model_dir, **cfg), "max_num_batched_tokens": 4096}, **spec})
    table = run_llm({"engine": {**engine(model_dir, **cfg, page_store="block-table"), "enable_chunked_prefill": True,
                                "max_num_batched_tokens": 256}, **spec})
    assert_same_outputs(table, cpu)


@pytest.mark.slow
def test_triton_route_equals_cpu_route(model_dir, haystack_ids):
    """Exactly the CUDA route (step plan -> block-table page store -> the Triton
    kernels, run by Triton's interpreter on CPU tensors) in the real engine, against
    the CPU route (vLLM's CPU ops): a compressed prompt (each head keeps 64 of 150
    tokens) and an uncompressed one (30 tokens), decoded together; the Triton route
    prefills in chunks of 64 tokens, the CPU route in one step. Catches wiring, layout
    and indexing bugs of the CUDA route before a GPU sees it (the interpreter is slow:
    short prompts, few tokens)."""
    cfg = {"policy": "snapkv", "kv_size": 64}
    prompts = [haystack_ids[3000:3150], haystack_ids[8000:8030]]
    spec = {"prompts": prompts, "sampling": dict(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=5)}
    cpu = run_llm({"engine": {**engine(model_dir, **cfg), "max_num_batched_tokens": 4096}, **spec})
    assert os.environ["TRITON_INTERPRET"] == "1"  # set by conftest without CUDA; the engine inherits it
    triton = run_llm({"engine": {**engine(model_dir, **cfg, page_store="block-table-triton"),
                                 "enable_chunked_prefill": True, "max_num_batched_tokens": 64}, **spec})
    assert_same_outputs(triton, cpu)
