"""The scheduler side of head pages: ``HeadKVSpec`` and ``HeadKVManager`` inside vLLM's
own ``KVCacheManager`` and ``BlockPool`` (built as vLLM's KV-cache tests build them, with
real ``Request``s), stepped as the scheduler steps them: ``allocate_slots`` per step,
``num_computed_tokens`` advanced and a sampled token appended after it, ``free`` at the end.

Expected page counts come from the layout written out here (docs/kv_layout.md): head h
of a layer holds ``min(seen, kept[h]) + generated`` tokens and ``ceil(len / block_size)``
pages; a prompt prefilled in chunks holds every head uncompressed until its last chunk.
"""

import math

import pytest
import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.request import Request

from headkv_vllm.engine.kv_spec import HeadKVManager, HeadKVSpec, to_head_specs
from headkv_vllm.engine.vllm_patches import register_kv_cache_spec
from headkv_vllm.method.budgets import FULL, BudgetRule

BS = 4  # small pages: every few tokens a head crosses a page boundary
NUM_LAYERS, NUM_KV_HEADS, HEAD_SIZE = 2, 3, 8
MAX_MODEL_LEN = 512
# Skewed per-head scores: heads of one layer keep very different numbers of tokens.
RULE = BudgetRule(policy="headkv", kv_size=24, window=4, beta=1.5, redistribute=True, num_layers=NUM_LAYERS,
                  num_kv_heads=NUM_KV_HEADS, scores=((1.0, 6.0, 0.2), (3.0, 0.1, 9.0)))


def pages(kept: tuple[int, ...], prompt_len: int, num_tokens: int) -> int:
    """One layer's head pages once ``num_tokens`` tokens have a slot (docs/kv_layout.md)."""
    seen, generated = min(prompt_len, num_tokens), max(0, num_tokens - prompt_len)
    return sum(math.ceil((min(seen, k) + generated) / BS) for k in kept)


def uncompressed(num_tokens: int) -> int:
    return NUM_KV_HEADS * math.ceil(num_tokens / BS)


def kept_of(kv_size, prompt_len: int) -> tuple[tuple[int, ...], ...]:
    return RULE.budgets(kv_size).kept(prompt_len)


class Engine:
    """vLLM's KV-cache manager over one HeadKVSpec group per layer, and the scheduler's
    part of a step: allocate, then count the tokens computed and append the sampled one."""

    def __init__(self, num_blocks: int = 4000, chunk_tokens: int = 0):
        register_kv_cache_spec(HeadKVSpec, HeadKVManager)  # what the plugin does (vllm_patches patch 5)
        stock = {f"model.layers.{i}.self_attn.attn": FullAttentionSpec(
            block_size=BS, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE, dtype=torch.float32)
            for i in range(NUM_LAYERS)}
        specs = to_head_specs(stock, RULE.budgets(), chunk_tokens, RULE)
        config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                               kv_cache_groups=[KVCacheGroupSpec([name], spec) for name, spec in specs.items()])
        self.kv = KVCacheManager(config, max_model_len=MAX_MODEL_LEN, scheduler_block_size=BS, hash_block_size=BS,
                                 enable_caching=False)
        self.managers = self.kv.coordinator.single_type_managers
        self.requests: dict[str, Request] = {}
        for manager in self.managers:
            manager.requests = self.requests  # what vllm_patches patch 8 does when the scheduler is built
        self.free0 = self.free()

    def add(self, request_id: str, prompt_len: int, kv_size=None) -> Request:
        extra = None if kv_size is None else {"headkv_kv_size": kv_size}
        request = Request(request_id=request_id, prompt_token_ids=list(range(1, prompt_len + 1)),
                          sampling_params=SamplingParams(max_tokens=64, extra_args=extra), pooling_params=None)
        self.requests[request_id] = request
        return request

    def step(self, request: Request, num_new_tokens: int, **kwargs):
        blocks = self.kv.allocate_slots(request, num_new_tokens, **kwargs)
        if blocks is not None:
            request.num_computed_tokens += num_new_tokens
            if request.num_computed_tokens >= request.num_prompt_tokens:
                request.append_output_token_ids(7)
        return blocks

    def row_entries(self, request: Request) -> list[int]:
        """Block-table entries of the request per layer, null entries included."""
        return [len(m.req_to_blocks.get(request.request_id, ())) for m in self.managers]

    def held(self, request: Request) -> list[int]:
        """Pages the request holds per layer (its entries less the null ones)."""
        return [sum(not b.is_null for b in m.req_to_blocks.get(request.request_id, ())) for m in self.managers]

    def free(self) -> int:
        return self.kv.block_pool.get_num_free_blocks()


def test_every_layer_gets_a_head_kv_manager():
    engine = Engine()
    assert [type(m) for m in engine.managers] == [HeadKVManager] * NUM_LAYERS
    assert [m.kv_cache_spec.layer_index for m in engine.managers] == list(range(NUM_LAYERS))


# Prompts shorter than the window, between the smallest and largest head budget, and far
# longer than every budget; lengths on and off page boundaries.
@pytest.mark.parametrize("prompt_len", [3, 4, 9, 16, 23, 40, 61, 200])
def test_pages_follow_the_prompt_then_grow_one_token_a_step(prompt_len):
    engine = Engine()
    request = engine.add("r", prompt_len)
    kept = kept_of(None, prompt_len)
    assert engine.step(request, prompt_len) is not None
    expected = [pages(kept[layer], prompt_len, prompt_len) for layer in range(NUM_LAYERS)]
    assert engine.row_entries(request) == expected
    assert engine.free0 - engine.free() == sum(expected)
    for generated in range(1, 3 * BS + 2):
        engine.step(request, 1)
        expected = [pages(kept[layer], prompt_len, prompt_len + generated) for layer in range(NUM_LAYERS)]
        assert engine.row_entries(request) == engine.held(request) == expected, generated
        assert engine.free0 - engine.free() == sum(expected)


def test_a_long_prompt_keeps_far_fewer_pages_than_stock():
    engine = Engine()
    request = engine.add("r", 400)
    engine.step(request, 400)
    # every head keeps about kv_size tokens (24, window included) of the 400
    assert sum(engine.held(request)) < NUM_LAYERS * NUM_KV_HEADS * math.ceil(2 * RULE.kv_size / BS)
    assert sum(engine.held(request)) < NUM_LAYERS * uncompressed(400) // 5


@pytest.mark.parametrize("kv_size", [8, 48, 120, FULL])
def test_a_request_with_its_own_kv_size_gets_its_own_pages(kv_size):
    engine = Engine()
    own, server = engine.add("own", 150, kv_size), engine.add("server", 150)
    for request in (own, server):
        engine.step(request, 150)
        engine.step(request, 1)
    expected_own = [pages(kept_of(kv_size, 150)[layer], 150, 151) for layer in range(NUM_LAYERS)]
    assert engine.held(own) == expected_own
    assert engine.held(server) == [pages(kept_of(None, 150)[layer], 150, 151) for layer in range(NUM_LAYERS)]
    if kv_size == FULL:
        assert expected_own == [uncompressed(151)] * NUM_LAYERS
    assert engine.free0 - engine.free() == sum(expected_own) + sum(engine.held(server))


def test_a_chunked_prompt_holds_every_head_uncompressed_until_its_last_chunk():
    engine = Engine(chunk_tokens=32)
    n = 90
    request = engine.add("r", n)
    for done in (32, 64):
        engine.step(request, 32)
        assert engine.held(request) == [uncompressed(done)] * NUM_LAYERS
    engine.step(request, n - 64)  # the last chunk: compressed as it is computed
    kept = kept_of(None, n)
    compressed = [pages(kept[layer], n, n) for layer in range(NUM_LAYERS)]
    # the row keeps its uncompressed length: compressed pages behind leading entries that
    # are freed once the last chunk is computed
    assert engine.row_entries(request) == [uncompressed(n)] * NUM_LAYERS
    before = engine.free()
    engine.step(request, 1)  # the next step frees them
    offsets = [uncompressed(n) - c for c in compressed]
    assert engine.held(request) == [pages(kept[layer], n, n + 1) for layer in range(NUM_LAYERS)]
    assert engine.row_entries(request) == [o + h for o, h in zip(offsets, engine.held(request))]
    assert engine.free() - before == sum(offsets) - sum(h - c for h, c in zip(engine.held(request), compressed))
    for generated in range(2, 2 * BS):
        engine.step(request, 1)
        assert engine.held(request) == [pages(kept[layer], n, n + generated) for layer in range(NUM_LAYERS)]
    assert engine.free0 - engine.free() == sum(engine.held(request))


def test_admission_counts_a_prompt_longer_than_a_step_uncompressed():
    n = 90  # longer than the step's 32 tokens: certainly prefilled in chunks
    # a pool that holds the compressed prompt but not the uncompressed one
    compressed = sum(pages(kept_of(None, n)[layer], n, n) for layer in range(NUM_LAYERS))
    pool = (compressed + NUM_LAYERS * uncompressed(n)) // 2 + 1  # one null block, the rest between the two
    engine = Engine(num_blocks=pool, chunk_tokens=32)
    assert compressed < engine.free() < NUM_LAYERS * uncompressed(n)
    request = engine.add("r", n)
    assert engine.step(request, 32, full_sequence_must_fit=True) is None
    assert engine.free() == engine.free0
    # a prompt within one step is counted compressed (it holds no more than its compressed pages)
    short = engine.add("short", 30)
    assert engine.step(short, 30, full_sequence_must_fit=True) is not None


def test_free_returns_every_page_and_forgets_the_request():
    engine = Engine(chunk_tokens=32)
    a, b = engine.add("a", 70), engine.add("b", 20, 64)
    for request, chunks in ((a, (32, 32, 6)), (b, (20,))):
        for chunk in chunks:
            engine.step(request, chunk)
        for _ in range(5):
            engine.step(request, 1)
    assert engine.free() < engine.free0
    engine.kv.free(a)
    engine.kv.free(b)
    assert engine.free() == engine.free0
    assert engine.row_entries(a) == engine.row_entries(b) == [0] * NUM_LAYERS
    # the id comes back with another prompt: counted afresh (not chunked, its new length)
    again = engine.add("a", 12)
    engine.step(again, 12)
    assert engine.held(again) == [pages(kept_of(None, 12)[layer], 12, 12) for layer in range(NUM_LAYERS)]


def test_a_manager_without_the_schedulers_requests_says_which_patch_is_missing():
    engine = Engine()
    request = engine.add("r", 10)
    for manager in engine.managers:
        manager.requests = None
    with pytest.raises(RuntimeError, match="patch 8"):
        engine.step(request, 10)


def test_spec_sizes():
    spec = next(iter(Engine().managers)).kv_cache_spec
    assert spec.page_size_bytes == 2 * BS * HEAD_SIZE * 4  # one head page: K and V of BS tokens, fp32
    # the worst case is a short prompt, then a long generation: every head uncompressed
    assert spec.max_num_blocks_per_req(None, MAX_MODEL_LEN) == NUM_KV_HEADS * (MAX_MODEL_LEN // BS + 1)
    other = to_head_specs({"model.layers.1.self_attn.attn": FullAttentionSpec(
        block_size=BS, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE, dtype=torch.float32)}, RULE.budgets())
    with pytest.raises(AssertionError):  # vLLM probes mergeability by catching AssertionError
        HeadKVSpec.merge([spec, *other.values()])
