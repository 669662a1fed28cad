"""Per-head paging on the scheduler side: the KV-cache spec and its manager.

Every attention layer gets its own :class:`HeadKVSpec`, so each layer is its own
KV-cache group and one block is one *head page*: ``block_size`` tokens of one KV
head of one layer (``num_head_slots=1``). All groups alias one pool of head pages.
The manager only counts: a head's length is a deterministic function of the
prompt length and the number of tokens, so the scheduler knows every request's
page needs without hearing from the worker. See docs/kv_layout.md.
"""

from __future__ import annotations

import dataclasses

from headkv_vllm.method.bounded import BoundedCache
from headkv_vllm.method.budgets import BudgetRule, Budgets
from headkv_vllm.method.request_settings import request_kv_size
from headkv_vllm.method.layout import PageCounter, num_head_pages, uncompressed_pages
from headkv_vllm.engine.vllm_access import (
    AttentionSpec,
    FullAttentionSpec,
    SingleTypeKVCacheManager,
    block_table_width,
    cdiv,
    extract_layer_index,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadKVSpec(FullAttentionSpec):
    """One layer's KV cache in head pages. ``budgets`` is the whole model's table
    (redistribution of unused budget crosses layers); ``layer_index`` picks the row.
    ``rule`` makes the tables of requests that ask for their own KV size (None: every
    request gets ``budgets``)."""

    layer_index: int = -1
    budgets: Budgets | None = None
    rule: BudgetRule | None = None
    # A step's token budget when chunked prefill is on (0: off): longer prompts are
    # certainly prefilled in chunks, so admission counts their uncompressed pages.
    chunk_tokens: int = 0

    @property
    def prefix_cacheable(self) -> bool:
        return False  # compressed pages are not a shareable prefix

    def kept(self, prompt_len: int) -> tuple[int, ...]:
        return self.budgets.kept(prompt_len)[self.layer_index]

    def budgets_for(self, kv_size: int | str | None) -> Budgets:
        """The budgets of a request asking for ``kv_size`` (None: the server's)."""
        if kv_size is None or self.rule is None:
            return self.budgets
        return self.rule.budgets(kv_size)

    def pages_needed(self, prompt_len: int, num_tokens: int) -> int:
        return num_head_pages(self.kept(prompt_len), prompt_len, num_tokens, self.block_size)

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        # A chunked prompt's leading nulls plus its pages: at most one page per head more
        # than uncompressed (docs/kv_layout.md, "Compaction").
        return self.num_kv_heads * (cdiv(max_len, self.block_size) + 1)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # Worst case is uncompressed (a short prompt, then a long generation).
        max_len = vllm_config.model_config.max_model_len
        return self.num_kv_heads * cdiv(max_len, self.block_size) * self.page_size_bytes

    @classmethod
    def merge(cls, specs):
        # vLLM probes mergeability by catching AssertionError.
        if any(s != specs[0] for s in specs):
            raise AssertionError("HeadKV: layers never share a KV-cache group (one group per layer).")
        return specs[0]

    def is_uniform_with_collection(self, kv_cache_specs) -> bool:
        return all(s == self for s in kv_cache_specs.values())


def block_table_bytes(specs: dict, vllm_config) -> int:
    """Bytes of the model runner's block tables on the device: per KV-cache group (one
    per layer) an int32 row per request slot, ``num_kv_heads * ceil(max_len / block_size)``
    wide. That is layers x KV heads times stock's one table, and vLLM's memory profile
    does not count it (it is allocated with the KV cache)."""
    max_len = vllm_config.model_config.max_model_len
    slots = vllm_config.scheduler_config.max_num_seqs
    return sum(slots * block_table_width(s.max_num_blocks_per_req(vllm_config, max_len), s.block_size) * 4
               for s in specs.values())


def to_head_specs(specs: dict, budgets: Budgets, chunk_tokens: int = 0, rule: BudgetRule | None = None) -> dict:
    """Turn the runner's per-layer attention specs into per-layer HeadKVSpecs."""
    out = {}
    for name, spec in specs.items():
        if not isinstance(spec, AttentionSpec) or getattr(spec, "sliding_window", None):
            raise ValueError(f"HeadKV supports full-attention decoder layers only; layer {name} has {type(spec).__name__}.")
        layer = extract_layer_index(name)
        if spec.num_kv_heads != budgets.num_kv_heads or layer >= budgets.num_layers:
            raise ValueError(
                f"HeadKV budgets are {budgets.num_layers} layers x {budgets.num_kv_heads} KV heads "
                f"but layer {name} has {spec.num_kv_heads} KV heads (index {layer})."
            )
        out[name] = HeadKVSpec(
            block_size=spec.block_size,
            num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size,
            head_size_v=spec.head_size_v,
            dtype=spec.dtype,
            kv_quant_mode=spec.kv_quant_mode,
            num_head_slots=1,
            layer_index=layer,
            budgets=budgets,
            rule=rule,
            chunk_tokens=chunk_tokens,
        )
    return out


class HeadKVManager(SingleTypeKVCacheManager):
    """Allocates head pages: ``sum_h ceil(len_h / block_size)`` per layer.

    Pages are appended in the canonical order of docs/kv_layout.md, so the worker
    maps block-table position -> (head, page) from the lengths alone. A prompt
    prefilled in chunks holds every head uncompressed until its last chunk; its row
    then starts with ``row_offset`` entries that are freed (made null) as soon as the
    last chunk is computed, the way vLLM frees a sliding window's pages.
    """

    def __init__(self, kv_cache_spec: HeadKVSpec, **kwargs):
        super().__init__(kv_cache_spec, **kwargs)
        self.prompt_len: dict[str, int] = {}
        self.chunked: set[str] = set()  # requests whose prompt is (was) prefilled in chunks
        # The scheduler's requests by id (engine.vllm_patches hands them over once the scheduler
        # is built): a request's own KV size is in its sampling params.
        self.requests: dict | None = None
        self.server_counter = self._page_counter(None)
        # Page counters of requests' own KV sizes (least recently used dropped beyond), each
        # with fewer cached tables than the server size's: clients choose the sizes.
        self.own_counters: BoundedCache[int | str, PageCounter] = BoundedCache(self.MAX_OWN_SIZES)

    MAX_OWN_SIZES = 64
    OWN_SIZE_TABLES = 256

    def counter(self, request_id: str) -> PageCounter:
        """Page counts of the request's own budgets."""
        if self.requests is None:
            raise RuntimeError("HeadKV: the scheduler did not hand its requests to the KV-cache manager "
                               "(engine.vllm_patches patch 8); the scheduler class must run vLLM's Scheduler.__init__.")
        params = getattr(self.requests.get(request_id), "sampling_params", None)
        kv_size = request_kv_size(params.extra_args) if params is not None else None
        if kv_size is None:
            return self.server_counter
        counter = self.own_counters.get(kv_size)
        if counter is None:
            counter = self.own_counters.put(kv_size, self._page_counter(kv_size, self.OWN_SIZE_TABLES))
        return counter

    def _page_counter(self, kv_size: int | str | None, *max_tables: int) -> PageCounter:
        budgets, layer = self.kv_cache_spec.budgets_for(kv_size), self.kv_cache_spec.layer_index
        return PageCounter(lambda n: budgets.kept(n)[layer], self.block_size, *max_tables)

    def _pages(self, request_id: str, num_tokens: int) -> int:
        # Before the first real allocation of a fresh request, num_tokens == prompt length.
        n = self.prompt_len.get(request_id, num_tokens)
        return self.counter(request_id).row_entries(n, num_tokens, request_id in self.chunked or num_tokens < n)

    def remove_skipped_blocks(self, request_id, processed_computed_tokens, num_prompt_tokens=None):
        # allocate_slots calls this before every real allocation, which is where the
        # manager learns the prompt length; the computed tokens are those already
        # processed (under async scheduling, not the step in flight, which still reads
        # the uncompressed pages).
        if num_prompt_tokens is not None:
            self.prompt_len[request_id] = num_prompt_tokens
        n = self.prompt_len.get(request_id)
        if request_id in self.chunked and n is not None and processed_computed_tokens >= n:
            self._remove_blocks_in_range(request_id, 0, self.counter(request_id).offset(n))

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, *args, **kwargs) -> int:
        if len(new_computed_blocks):
            raise AssertionError("HeadKV: prefix-cache hits must not happen (prefix caching is off)")
        held = len(self.req_to_blocks.get(request_id, ()))
        if kwargs.get("apply_admission_cap") and not held:
            return self._admission_pages(request_id, num_tokens)
        return max(0, self._pages(request_id, num_tokens) - held)

    def _admission_pages(self, request_id: str, num_tokens: int) -> int:
        """vLLM's admission check of a waiting request (its whole sequence must fit, before
        the manager hears its prompt length). A prompt longer than a step's token budget is
        certainly prefilled in chunks and holds every head uncompressed at its last chunk;
        counting only its compressed pages admitted prompts whose later chunks then
        preempted them, again and again. A shorter prompt is counted compressed (it may
        still be chunked when other requests share its step)."""
        spec = self.kv_cache_spec
        if spec.chunk_tokens and num_tokens > spec.chunk_tokens:
            return uncompressed_pages(spec.num_kv_heads, num_tokens, self.block_size)
        return self.counter(request_id).pages(num_tokens, num_tokens)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        req_blocks = self.req_to_blocks[request_id]
        n = self._pages(request_id, num_tokens) - len(req_blocks)
        if n <= 0:
            return []
        if num_tokens < self.prompt_len.get(request_id, num_tokens):
            self.chunked.add(request_id)
        new = self.block_pool.get_new_blocks(n)
        req_blocks.extend(new)
        return new

    def pop_blocks_for_free(self, request_id):
        self.prompt_len.pop(request_id, None)
        self.chunked.discard(request_id)
        return super().pop_blocks_for_free(request_id)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, *args, **kwargs):
        return tuple([] for _ in kv_cache_group_ids), 0
