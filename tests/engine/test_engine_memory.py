"""Per-head paging in the real engine: memory freed by eviction admits more requests,
the scheduler holds exactly sum_h ceil(len_h / block_size) pages per layer, and
preemption and a small user token budget change nothing in the outputs."""

import math

import pytest

from support.engines import SMOL, engine, run_engine_script, run_llm
from headkv_vllm.method.config import HeadKVConfig
from headkv_vllm.engine.settings import resolve_budget_rule, resolve_budgets

BLOCK = 16
DTYPE_BYTES = 4  # float32
HEAD_PAGE_BYTES = 2 * BLOCK * SMOL.head_dim * DTYPE_BYTES  # K and V of one head of one layer
STOCK_BLOCK_BYTES = SMOL.num_layers * SMOL.num_kv_heads * HEAD_PAGE_BYTES  # all layers and heads


def probe(spec: dict) -> dict:
    return run_engine_script("engine_probe.py", spec)


def expected_pages(budgets, prompt_len: int, computed: int) -> list[int]:
    """sum over heads of ceil(len / block_size), per layer, for a request after ``computed`` tokens."""
    kept = budgets.kept(prompt_len)
    generated = computed - prompt_len
    return [sum(math.ceil((min(k, prompt_len) + generated) / BLOCK) for k in row) for row in kept]


def check_pages_every_step(result: dict, budgets) -> dict:
    """Every running request's row in every layer, after every step, as docs/kv_layout.md
    counts it: uncompressed pages while a prompt is chunked; past the prompt the head
    pages, plus (for a prompt prefilled in chunks) its leading entries, still held right
    after the last chunk and null from the next step on. ``budgets``: every request's,
    or a dict of them by request id. Returns what was seen."""
    budgets_of = budgets if isinstance(budgets, dict) else {}
    seen = {"compressed": 0, "chunks": 0, "held_offsets": 0, "null_offsets": 0,
            "preempted_mid_prefill": 0, "preempted_after_prefill": 0}
    last = {}  # request id -> (computed, preemptions) when last seen running
    for step in result["steps"]:
        for req in step["requests"]:
            n, t = req["prompt_len"], req["computed"]
            before = last.get(req["id"])
            if before is not None and req["preemptions"] > before[1]:  # preempted since: where was it?
                seen["preempted_mid_prefill" if before[0] < n else "preempted_after_prefill"] += 1
            last[req["id"]] = (t, req["preemptions"])
            if t < n:
                if t:
                    assert req["pages"] == [SMOL.num_kv_heads * math.ceil(t / BLOCK)] * SMOL.num_layers, req
                    assert not any(req["nulls"]), req
                    seen["chunks"] += 1
                continue
            own = budgets_of.get(req["id"], budgets)
            expected = expected_pages(own, n, t)
            extra = [p - e for p, e in zip(req["pages"], expected)]
            offsets = [SMOL.num_kv_heads * math.ceil(n / BLOCK) - e for e in expected_pages(own, n, n)]
            if any(extra):
                assert extra == offsets, req  # a chunked prompt's leading entries
                assert req["nulls"] in ([0] * SMOL.num_layers, offsets), req
                seen["null_offsets" if any(req["nulls"]) else "held_offsets"] += 1
            else:
                assert not any(req["nulls"]), req
            seen["compressed"] += 1
    assert seen["compressed"] > 0
    return seen


def check_one_plan_per_step(result: dict) -> None:
    """The worker builds one step plan per engine step for all 30 layers (each layer
    is its own KV-cache group, so a plan per layer would count 30)."""
    builds = result["plan_builds"]
    assert len(builds) == len(result["steps"])
    assert all(b == 1 for b, step in zip(builds, result["steps"]) if step["running"]), builds


def peak_decoding(result: dict) -> int:
    return max(sum(r["computed"] >= r["prompt_len"] for r in s["requests"]) for s in result["steps"])


@pytest.mark.slow
def test_ten_times_more_long_requests_decode_at_the_same_cache_size(model_dir, haystack_ids, skewed_scores):
    # The bytes of 250 stock 16-token blocks: one 3k-token request fits under stock vLLM, two do not.
    cache_bytes = 250 * STOCK_BLOCK_BYTES
    prompt_len, max_tokens = 3000, 24  # long enough that the first request still decodes when the last is admitted
    sampling = dict(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    # Each prompt prefilled in one step (a prompt prefilled in chunks holds its uncompressed
    # pages until its last chunk, as under stock vLLM; this pool fits only one of those).
    base = dict(max_model_len=3100, kv_cache_memory_bytes=cache_bytes, max_num_seqs=64, max_num_batched_tokens=4096)

    def prompts(n):
        return [haystack_ids[i * 1000 : i * 1000 + prompt_len] for i in range(n)]

    stock = probe({"engine": {**engine(model_dir), **base}, "prompts": prompts(2), "sampling": sampling})
    cfg = {"policy": "headkv", "kv_size": 128, "scores": skewed_scores}
    headkv = probe({"engine": {**engine(model_dir, **cfg), **base}, "prompts": prompts(12), "sampling": sampling})

    # Same bytes: a stock block holds all layers and heads (its block size is the
    # platform's), a HEADKV page one head of one layer.
    stock_token_bytes = STOCK_BLOCK_BYTES // BLOCK
    assert stock["num_blocks"] == cache_bytes // (stock_token_bytes * stock["block_size"])
    assert headkv["num_blocks"] == cache_bytes // HEAD_PAGE_BYTES
    assert peak_decoding(stock) == 1
    assert peak_decoding(headkv) >= 10 * peak_decoding(stock)
    assert len(headkv["token_ids"]) == 12 and all(len(t) == max_tokens for t in headkv["token_ids"].values())

    budgets, _ = resolve_budgets(HeadKVConfig.from_mapping(cfg), SMOL)
    check_pages_every_step(headkv, budgets)
    check_one_plan_per_step(headkv)
    for result in (stock, headkv):
        assert result["free_at_end"] == result["free_at_start"]


@pytest.mark.slow
def test_preemption_and_small_token_budget_keep_outputs(model_dir, haystack_ids, skewed_scores):
    cfg = {"policy": "headkv", "kv_size": 128, "scores": skewed_scores}
    budgets, _ = resolve_budgets(HeadKVConfig.from_mapping(cfg), SMOL)
    # prompts up to 512 tokens are prefilled in one step, the longer ones in chunks of 512
    lengths = [300, 900, 350, 330, 400, 380, 450, 880]
    prompts = [haystack_ids[i * 1000 : i * 1000 + n] for i, n in enumerate(lengths)]
    max_tokens = 100
    sampling = dict(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    max_len = 1024
    full = run_llm({"engine": {**engine(model_dir, **cfg), "max_model_len": max_len, "max_num_seqs": 16},
                    "prompts": prompts, "sampling": sampling})

    # The smallest pool vLLM accepts holds one uncompressed max-length request; the
    # compressed requests admitted into it outgrow it while decoding. (A chunked prompt is
    # admitted only when its uncompressed pages are free, so it is rarely the victim.)
    pool = SMOL.num_layers * SMOL.num_kv_heads * math.ceil(max_len / BLOCK) + 200
    assert pool < sum(sum(expected_pages(budgets, n, n + max_tokens)) for n in lengths)
    small = probe({
        "engine": {**engine(model_dir, **cfg), "max_model_len": max_len, "max_num_seqs": 16,
                   "kv_cache_memory_bytes": (pool + 1) * HEAD_PAGE_BYTES,
                   # prompts prefilled in chunks, sharing steps with decodes
                   "max_num_batched_tokens": 512, "enable_chunked_prefill": True},
        "prompts": prompts, "sampling": sampling,
        # and, for certain, a preemption of a prompt between two of its chunks (uncompressed
        # pages) and one of a decoding request (compressed pages, maybe a leading null run)
        "squeeze": ["mid_prefill", "decode"],
    })
    assert [(s["phase"], s["released_at"] is not None) for s in small["squeezes"]] == \
        [("mid_prefill", True), ("decode", True)], small["squeezes"]
    seen = check_pages_every_step(small, budgets)
    assert seen["chunks"] and seen["held_offsets"] and seen["null_offsets"], seen
    assert seen["preempted_mid_prefill"] and seen["preempted_after_prefill"], seen
    check_one_plan_per_step(small)
    assert small["free_at_end"] == small["free_at_start"]
    assert [small["token_ids"][str(i)] for i in range(len(prompts))] == full["token_ids"]


@pytest.mark.slow
def test_async_scheduling_with_preemption_keeps_outputs(model_dir, haystack_ids, skewed_scores):
    """Async scheduling (vLLM's default on CUDA; the CPU platform turns it off, the
    probe turns it back on): the scheduler plans step N+1 while step N runs. Pages
    equal the formula at every step, preemption and recomputation happen, the pool
    comes back whole and the outputs equal synchronous scheduling's."""
    cfg = {"policy": "headkv", "kv_size": 128, "scores": skewed_scores}
    budgets, _ = resolve_budgets(HeadKVConfig.from_mapping(cfg), SMOL)
    lengths = [300, 900, 350, 850, 400, 800]  # one step, or chunks of 512
    prompts = [haystack_ids[i * 1000 : i * 1000 + n] for i, n in enumerate(lengths)]
    max_len, max_tokens = 1024, 80
    pool = SMOL.num_layers * SMOL.num_kv_heads * math.ceil(max_len / BLOCK) + 200
    # prompts in chunks: the scheduler frees a chunked prompt's leading pages only once
    # the step with its last chunk has run, not when it is scheduled
    base = {"engine": {**engine(model_dir, **cfg), "max_model_len": max_len, "max_num_seqs": 16,
                       "kv_cache_memory_bytes": (pool + 1) * HEAD_PAGE_BYTES,
                       "enable_chunked_prefill": True, "max_num_batched_tokens": 512},
            "prompts": prompts, "sampling": dict(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)}
    sync = probe(base)
    overlapped = probe({**base, "async_scheduling": True})
    assert overlapped["async_scheduling"] and overlapped["scheduler"] == "AsyncScheduler"
    assert not sync["async_scheduling"]
    assert overlapped["preemptions"] > 0
    seen = check_pages_every_step(overlapped, budgets)
    assert seen["chunks"] and seen["null_offsets"], seen
    assert overlapped["free_at_end"] == overlapped["free_at_start"]
    assert overlapped["token_ids"] == sync["token_ids"]


@pytest.mark.slow
def test_requests_with_their_own_kv_sizes(model_dir, haystack_ids):
    """Per-request budgets (SamplingParams.extra_args ``headkv_kv_size``, the OpenAI
    request's ``vllm_xargs``): requests of 64, the server's 128, 512 and "full" (no
    compression) tokens per KV head share steps, in chunks of 512 tokens; each holds the
    pages of its own budgets at every step and keeps its own budgets' tokens, and the
    "full" request's greedy tokens equal stock vLLM's."""
    cfg = {"policy": "headkv", "kv_size": 128}  # the committed SmolLM2 R2 scores
    sizes = [64, None, 512, "full"]
    # three of the same length: what a request keeps must follow its size, not its length
    prompts = [haystack_ids[i * 3000 : i * 3000 + n] for i, n in enumerate([1200, 900, 1200, 1200])]
    sampling = dict(temperature=0.0, max_tokens=24, ignore_eos=True)
    result = probe({
        "engine": {**engine(model_dir, **cfg), "enable_chunked_prefill": True, "max_num_batched_tokens": 512},
        "prompts": prompts, "sampling": sampling,
        "extra_args": [None if k is None else {"headkv_kv_size": k} for k in sizes],
    })
    rule, _ = resolve_budget_rule(HeadKVConfig.from_mapping(cfg), SMOL)
    own = {str(i): rule.budgets(k) for i, k in enumerate(sizes)}
    seen = check_pages_every_step(result, own)
    assert seen["chunks"] and seen["compressed"], seen
    assert max(s["running"] for s in result["steps"]) == len(prompts)  # they shared steps
    for i, (prompt, k) in enumerate(zip(prompts, sizes)):
        assert result["kept"][str(i)] == [list(row) for row in own[str(i)].kept(len(prompt))], k
    means = [sum(map(sum, result["kept"][str(i)])) / (SMOL.num_layers * SMOL.num_kv_heads) for i in range(4)]
    assert means[0] < means[1] < means[2] < means[3] == len(prompts[3]), means  # 64 < 128 < 512 < whole prompt
    assert result["free_at_end"] == result["free_at_start"]

    stock = run_llm({"engine": engine(model_dir), "prompts": [prompts[3]], "sampling": sampling})
    assert result["token_ids"]["3"] == stock["token_ids"][0]
