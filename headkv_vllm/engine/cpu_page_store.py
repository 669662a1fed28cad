"""The CPU page store: head pages written and read by vLLM's CPU cache and attention
ops, one "sequence" per (query token, KV head) whose block-table row is that head's
page list (docs/kv_layout.md, "Pages"). Decode reads the kept tokens in place, at
the speed stock vLLM reads its dense cache.

On the CPU the host is the device, so the per-layer page lists and the kernel's
work split are built here, in ``layer_state``: one gather from the layer's block
table per step, from page positions computed once per step for all layers.

``CpuPromptAttention`` is the CPU route's prefill attention: the prompts' K/V go
into a scratch cache of stock CPU blocks and vLLM's CPU attention op attends over
them, as stock vLLM prefills (SDPA in fp32 took ~1.3x its time).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from headkv_vllm.core.page_store import KernelOps
from headkv_vllm.core.plan import PrefillPlan, StepPlan
from headkv_vllm.engine.vllm_access import cpu_attention, cpu_attention_isa, cpu_attention_schedule, cpu_cache_write
from headkv_vllm.kernels.select_store import select_sources
from headkv_vllm.method.bounded import BoundedCache
from headkv_vllm.method.layout import page_positions


def page_caches(pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pages[num_blocks, 2, block_size, d]`` as the CPU ops' one-head K and V caches
    (``[num_blocks, 1, block_size, d]`` views: a page is K rows, then V rows)."""
    num_blocks, _, block_size, d = pages.shape
    key_cache, value_cache = pages.view(num_blocks, 1, 2 * block_size, d).chunk(2, dim=2)
    return key_cache, value_cache


def store_tokens(key: torch.Tensor, value: torch.Tensor, pages: torch.Tensor, slots: torch.Tensor, isa: str) -> None:
    """Write ``key[i]``/``value[i]`` (``[M, d]``) at head-page slot ``slots[i]`` (int64)."""
    cpu_cache_write(key[:, None], value[:, None], *page_caches(pages), slots, isa)


def attend_head_pages(query: torch.Tensor, pages: torch.Tensor, output: torch.Tensor, seqs: "HeadSequences",
                      scale: float) -> None:
    """``query``/``output`` ``[S, G, d]``: sequence s is one query token of the G query heads
    of one KV head, over the head pages ``seqs.block_tables[s]``."""
    cpu_attention(query, *page_caches(pages), output, seqs.query_start_loc, seqs.seq_lens, seqs.block_tables,
                  seqs.schedule, scale)


@dataclass(frozen=True)
class HeadSequences:
    """Inputs of vLLM's CPU attention op with one sequence per (query token, KV head)."""

    query_start_loc: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor  # [S] int32
    block_tables: torch.Tensor  # [S, J] int32 pages of each sequence's head, in head order
    schedule: torch.Tensor  # the op's work split


@dataclass(frozen=True)
class CpuLayer:
    rows: torch.Tensor  # [R, W] int32 the layer's block-table rows as vLLM holds them
    head_blocks: torch.Tensor  # [R, Hkv, J] int32 page j of head h of request r
    lengths: torch.Tensor  # [R, Hkv] int32
    decode: HeadSequences | None
    decode_slots: torch.Tensor | None  # [D * Hkv] int64 slot of each decode token in each head


class CpuPageStore:
    def __init__(self, dtype: torch.dtype, block_size: int, head_size: int, num_heads: int, num_kv_heads: int):
        self.dtype, self.block_size, self.head_size = dtype, block_size, head_size
        self.ops = KernelOps.choose(triton=False)  # the layers' window scores; vLLM's CPU ops do the rest
        self.queries_per_kv = num_heads // num_kv_heads
        self.isa = cpu_attention_isa(dtype, block_size, head_size)
        self.attend_prompts = CpuPromptAttention(dtype, head_size, num_heads, num_kv_heads)
        self._positions: tuple[tuple, torch.Tensor] | None = None
        # (prompt length, own KV size) -> positions, bounded by the int32 entries they hold
        self._by_prompt: BoundedCache[tuple, torch.Tensor] = BoundedCache(self.MAX_CACHED_POSITIONS,
                                                                          weight=torch.Tensor.numel)

    def _page_positions(self, plan: StepPlan, row_width: int) -> torch.Tensor:
        """[L, R, Hkv, J] block-table position of each head page, for all layers.

        A page's position depends only on the request's kept tokens, i.e. on its prompt
        length and KV size, so it is computed once per (prompt length, KV size) for every
        page a head can reach, and restacked only when the batch or its page count changes."""
        layout = plan.layout
        key = (layout.prompt_lens, layout.kv_sizes, layout.max_pages, row_width)
        if self._positions is None or self._positions[0] != key:
            max_pages, kept = layout.max_pages, layout.kept_host
            # pages a head can reach: the row's share, cached to the next power of two in use
            reach = min(1 << max(3, (max_pages - 1).bit_length()), max(1, row_width // kept.shape[2]))
            reach = max(reach, max_pages)
            per_prompt = [self._positions_of((n, k), kept[:, r], reach)[:, :, :max_pages]
                          for r, (n, k) in enumerate(zip(layout.prompt_lens, layout.kv_sizes))]
            pos = torch.stack(per_prompt, dim=1).long() if per_prompt else \
                torch.zeros(kept.shape + (max_pages,), dtype=torch.long)
            # pages a head never reaches may sort past the row's end; they are never read
            self._positions = (key, pos.clamp_(max=row_width - 1))
        return self._positions[1]

    # int32 entries (16 MB) the cache holds, least recently used dropped beyond. Mixed
    # prompt lengths make thousands of keys; a larger bound only grew the worker's memory.
    MAX_CACHED_POSITIONS = 1 << 22

    def _positions_of(self, key: tuple, kept: torch.Tensor, reach: int) -> torch.Tensor:
        """[L, Hkv, >= reach] int32 positions of a request with this (prompt length, KV size),
        whose heads keep ``kept`` [L, Hkv] (cached)."""
        pos = self._by_prompt.get(key)
        if pos is None or pos.shape[2] < reach:
            pos = self._by_prompt.put(key, page_positions(kept.long(), self.block_size, reach).to(torch.int32))
        return pos

    def _sequences(self, lengths: torch.Tensor, head_blocks: torch.Tensor) -> HeadSequences:
        """lengths [B, Hkv], head_blocks [B, Hkv, J] -> one sequence per (row, head)."""
        seqs = lengths.numel()
        seq_lens = lengths.flatten().to(torch.int32)
        qsl = torch.arange(seqs + 1, dtype=torch.int32)
        return HeadSequences(
            query_start_loc=qsl, seq_lens=seq_lens, block_tables=head_blocks.reshape(seqs, -1).to(torch.int32),
            schedule=cpu_attention_schedule(seq_lens, qsl, self.queries_per_kv, 1, self.head_size, self.dtype, self.isa),
        )

    def layer_state(self, plan: StepPlan, layer: int, block_table: torch.Tensor) -> CpuLayer:
        width = block_table.shape[1]
        pos = self._page_positions(plan, width)[layer]  # [R, H, J]
        if plan.layout.has_offsets:  # rows of chunked prompts start with null entries
            pos = (pos + plan.layout.offsets_host[layer][:, None, None]).clamp_(max=width - 1)
        R = pos.shape[0]
        head_blocks = block_table[:R].gather(1, pos.reshape(R, -1)).view(pos.shape)  # int32
        lengths = plan.layout.lengths_host[layer]
        decode = decode_slots = None
        if plan.num_decodes:
            d = plan.decode.reqs_host
            d_lengths, d_blocks = lengths[d], head_blocks[d]
            last = (d_lengths - 1).long()[:, :, None]
            decode_slots = (d_blocks.gather(2, last // self.block_size).long() * self.block_size
                            + last % self.block_size).flatten()
            decode = self._sequences(d_lengths, d_blocks)
        return CpuLayer(rows=block_table, head_blocks=head_blocks, lengths=lengths, decode=decode, decode_slots=decode_slots)

    def store_prefill(self, state: CpuLayer, pf: PrefillPlan, scores, k, v, pages) -> None:
        r, bs = pf.row, self.block_size
        lengths = state.lengths[r]
        caps = (lengths - pf.generated - pf.window).long()  # prefix tokens each head keeps
        if bool((caps >= pf.prompt_len - pf.window).all()):
            # every head keeps every token: position p holds step token p
            p = torch.arange(pf.num_tokens)
            slots = state.head_blocks[r][:, p // bs].long() * bs + p % bs  # [Hkv, T]
            d = k.shape[-1]
            store_tokens(k.transpose(0, 1).reshape(-1, d), v.transpose(0, 1).reshape(-1, d), pages,
                         slots.flatten(), self.isa)
            return
        src, valid = select_sources(scores, caps, lengths.long(), pf.max_len)
        p = torch.arange(pf.max_len)
        slots = state.head_blocks[r][:, p // bs].long() * bs + p % bs  # [Hkv, Lmax]
        head = torch.arange(k.shape[1])[:, None].expand_as(src)[valid]
        store_tokens(k[src[valid], head], v[src[valid], head], pages, slots[valid], self.isa)

    def append_decode(self, state: CpuLayer, k, v, pages) -> None:
        d = k.shape[-1]
        store_tokens(k.reshape(-1, d), v.reshape(-1, d), pages, state.decode_slots, self.isa)

    def attend_decode(self, state: CpuLayer, q, pages, scale: float) -> torch.Tensor:
        return self._attend(state.decode, q, pages, scale)

    def append_tokens(self, state: CpuLayer, pf: PrefillPlan, k, v, pages) -> None:
        r, g, bs = pf.row, pf.new_generated, self.block_size
        positions = (state.lengths[r][None, :] - g + torch.arange(g)[:, None]).long()  # [g, Hkv]
        heads = torch.arange(positions.shape[1])[None, :]
        slots = state.head_blocks[r][heads, positions // bs].long() * bs + positions % bs
        d = k.shape[-1]
        store_tokens(k.reshape(-1, d), v.reshape(-1, d), pages, slots.flatten(), self.isa)

    def attend_recomputed(self, state: CpuLayer, pf: PrefillPlan, q, pages, scale: float) -> torch.Tensor:
        r, g = pf.row, pf.new_generated
        step = torch.arange(1 - g, 1)[:, None]
        lengths = state.lengths[r][None, :] + step  # [g, Hkv]
        return self._attend(self._sequences(lengths, state.head_blocks[r].expand(g, -1, -1)), q, pages, scale)

    def _attend(self, seqs: HeadSequences, q: torch.Tensor, pages: torch.Tensor, scale: float) -> torch.Tensor:
        grouped = q.reshape(-1, self.queries_per_kv, self.head_size)  # query heads of KV head h are contiguous
        result = torch.empty_like(grouped)
        attend_head_pages(grouped, pages, result, seqs, scale)
        return result.view(q.shape)


class CpuPromptAttention:
    """``core.prompt_attention.PromptAttention`` on the CPU: all prompts of the step in one call
    of vLLM's CPU attention op, over a scratch cache of stock CPU blocks that holds every
    KV head (reused across layers and steps, grown when needed). The scratch layout and
    the op's work split depend on the step only, so all layers of a step share them."""

    BLOCK_SIZE = 128  # vLLM's CPU block size: the op's prefill tiles are ~1.4x faster than at 16

    def __init__(self, dtype: torch.dtype, head_size: int, num_heads: int, num_kv_heads: int):
        block_size = self.BLOCK_SIZE
        self.dtype, self.block_size, self.head_size = dtype, block_size, head_size
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.isa = cpu_attention_isa(dtype, block_size, head_size)
        self._scratch: torch.Tensor | None = None  # [2, num_blocks, Hkv, block_size, d]
        self._step: tuple[StepPlan, tuple] | None = None

    def _layout(self, plan: StepPlan):
        """Slots of the packed prompt tokens, block tables and work split (once per step)."""
        if self._step is None or self._step[0] is not plan:
            bs = self.block_size
            lens = [pf.context + pf.prompt_queries for pf in plan.prefills if pf.prompt_queries]  # keys
            blocks = [-(-n // bs) for n in lens]
            first = list(itertools.accumulate(blocks[:-1], initial=0))
            slots = torch.cat([torch.arange(n) + b * bs for n, b in zip(lens, first)])
            table = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
            for i, (b, nb) in enumerate(zip(first, blocks)):
                table[i, :nb] = torch.arange(b, b + nb, dtype=torch.int32)
            seq_lens = torch.tensor(lens, dtype=torch.int32)
            qsl = plan.prompts.cu_seqlens_q.to(torch.int32)
            schedule = cpu_attention_schedule(seq_lens, qsl, self.num_heads, self.num_kv_heads, self.head_size,
                                              self.dtype, self.isa)
            last = torch.tensor([b + nb - 1 for b, nb in zip(first, blocks)])
            self._step = (plan, (sum(blocks), slots, last, table, seq_lens, qsl, schedule))
        return self._step[1]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: StepPlan, scale: float) -> torch.Tensor:
        num_blocks, slots, last, table, seq_lens, qsl, schedule = self._layout(plan)
        if self._scratch is None or self._scratch.shape[1] < num_blocks or self._scratch.dtype != k.dtype:
            self._scratch = torch.empty(2, num_blocks, self.num_kv_heads, self.block_size, self.head_size,
                                        dtype=k.dtype)
        key_cache, value_cache = self._scratch[0], self._scratch[1]
        # The op reads whole blocks: the unused tail of each prompt's last block must be
        # finite (stale or uninitialised memory can hold NaN, which masking does not stop).
        key_cache[last] = 0
        value_cache[last] = 0
        cpu_cache_write(k, v, key_cache, value_cache, slots, self.isa)
        out = torch.empty_like(q)
        cpu_attention(q, key_cache, value_cache, out, qsl, seq_lens, table, schedule, scale)
        return out
