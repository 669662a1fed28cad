"""The CPU page store: head pages written and read by vLLM's CPU cache and attention
ops, one "sequence" per (query token, KV head) whose block-table row is that head's
page list (docs/kv_layout.md, "Pages"). Decode reads the kept tokens in place, at
the speed stock vLLM reads its dense cache.

On the CPU the host is the device, so the per-layer page lists and the kernel's
work split are built here, in ``layer_state``: one gather from the layer's block
table per step, from page positions computed once per step for all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headkv_vllm.core.plan import PrefillPlan, StepPlan
from headkv_vllm.engine.compat import (
    cpu_attention_isa,
    cpu_attention_schedule,
    cpu_head_attention,
    cpu_store_tokens,
)
from headkv_vllm.kernels.select_store import select_sources
from headkv_vllm.method.layout import page_positions


@dataclass(frozen=True)
class HeadSequences:
    """Inputs of vLLM's CPU attention op with one sequence per (query token, KV head)."""

    query_start_loc: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor  # [S] int32
    block_tables: torch.Tensor  # [S, J] int32 pages of each sequence's head, in head order
    schedule: torch.Tensor  # the op's work split


@dataclass(frozen=True)
class CpuLayer:
    head_blocks: torch.Tensor  # [R, Hkv, J] int32 page j of head h of request r
    lengths: torch.Tensor  # [R, Hkv] int32
    decode: HeadSequences | None
    decode_slots: torch.Tensor | None  # [D * Hkv] int64 slot of each decode token in each head


class CpuPageStore:
    def __init__(self, dtype: torch.dtype, block_size: int, head_size: int, queries_per_kv: int):
        self.dtype, self.block_size, self.head_size = dtype, block_size, head_size
        self.queries_per_kv = queries_per_kv
        self.isa = cpu_attention_isa(dtype, block_size, head_size)
        self._positions: tuple[tuple, torch.Tensor] | None = None
        self._by_prompt: dict[int, torch.Tensor] = {}

    def _page_positions(self, plan: StepPlan, row_width: int) -> torch.Tensor:
        """[L, R, Hkv, J] block-table position of each head page, for all layers.

        A page's position depends only on the request's prompt length (through
        ``kept``), so it is computed once per prompt length for every page a head can
        reach, and restacked only when the batch or its page count changes."""
        key = (tuple(plan.prompt_lens), plan.max_pages)
        if self._positions is None or self._positions[0] != key:
            reach = max(plan.max_pages, row_width // plan.kept_host.shape[2])
            per_prompt = [self._positions_of(n, r, plan, reach)[:, :, : plan.max_pages]
                          for r, n in enumerate(plan.prompt_lens)]
            pos = torch.stack(per_prompt, dim=1) if per_prompt else \
                torch.zeros(plan.kept_host.shape + (plan.max_pages,), dtype=torch.long)
            # pages a head never reaches may sort past the row's end; they are never read
            self._positions = (key, pos.clamp_(max=row_width - 1))
        return self._positions[1]

    def _positions_of(self, prompt_len: int, row: int, plan: StepPlan, reach: int) -> torch.Tensor:
        """[L, Hkv, reach] positions of a request with this prompt length (cached)."""
        pos = self._by_prompt.get(prompt_len)
        if pos is None or pos.shape[2] < reach:
            if len(self._by_prompt) >= 4096:
                self._by_prompt.clear()
            pos = self._by_prompt[prompt_len] = page_positions(plan.kept_host[:, row].long(), self.block_size, reach)
        return pos

    def _sequences(self, lengths: torch.Tensor, head_blocks: torch.Tensor) -> HeadSequences:
        """lengths [B, Hkv], head_blocks [B, Hkv, J] -> one sequence per (row, head)."""
        seqs = lengths.numel()
        seq_lens = lengths.flatten().to(torch.int32)
        qsl = torch.arange(seqs + 1, dtype=torch.int32)
        return HeadSequences(
            query_start_loc=qsl, seq_lens=seq_lens, block_tables=head_blocks.reshape(seqs, -1).to(torch.int32),
            schedule=cpu_attention_schedule(seq_lens, qsl, self.queries_per_kv, self.head_size, self.dtype, self.isa),
        )

    def layer_state(self, plan: StepPlan, layer: int, block_table: torch.Tensor) -> CpuLayer:
        pos = self._page_positions(plan, block_table.shape[1])[layer]  # [R, H, J]
        R = pos.shape[0]
        head_blocks = block_table[:R].gather(1, pos.reshape(R, -1)).view(pos.shape)  # int32
        lengths = plan.lengths_host[layer]
        decode = decode_slots = None
        if plan.num_decodes:
            d = plan.decode_reqs_host
            d_lengths, d_blocks = lengths[d], head_blocks[d]
            last = (d_lengths - 1).long()[:, :, None]
            decode_slots = (d_blocks.gather(2, last // self.block_size).long() * self.block_size
                            + last % self.block_size).flatten()
            decode = self._sequences(d_lengths, d_blocks)
        return CpuLayer(head_blocks=head_blocks, lengths=lengths, decode=decode, decode_slots=decode_slots)

    def store_prefill(self, state: CpuLayer, pf: PrefillPlan, scores, k, v, pages) -> None:
        r, bs = pf.row, self.block_size
        lengths = state.lengths[r]
        caps = (lengths - pf.generated - pf.window).long()  # prefix tokens each head keeps
        src, valid = select_sources(scores, caps, lengths.long(), pf.max_len)
        p = torch.arange(pf.max_len)
        slots = state.head_blocks[r][:, p // bs].long() * bs + p % bs  # [Hkv, Lmax]
        head = torch.arange(k.shape[1])[:, None].expand_as(src)[valid]
        cpu_store_tokens(k[src[valid], head], v[src[valid], head], pages, slots[valid], self.isa)

    def append_decode(self, state: CpuLayer, k, v, pages) -> None:
        d = k.shape[-1]
        cpu_store_tokens(k.reshape(-1, d), v.reshape(-1, d), pages, state.decode_slots, self.isa)

    def attend_decode(self, state: CpuLayer, q, pages, scale: float) -> torch.Tensor:
        return self._attend(state.decode, q, pages, scale)

    def attend_recomputed(self, state: CpuLayer, pf: PrefillPlan, q, pages, scale: float) -> torch.Tensor:
        r, g = pf.row, pf.generated
        step = torch.arange(1 - g, 1)[:, None]
        lengths = state.lengths[r][None, :] + step  # [g, Hkv]
        return self._attend(self._sequences(lengths, state.head_blocks[r].expand(g, -1, -1)), q, pages, scale)

    def _attend(self, seqs: HeadSequences, q: torch.Tensor, pages: torch.Tensor, scale: float) -> torch.Tensor:
        grouped = q.reshape(-1, self.queries_per_kv, self.head_size)  # query heads of KV head h are contiguous
        result = torch.empty_like(grouped)
        cpu_head_attention(grouped, pages, result, seqs.query_start_loc, seqs.seq_lens, seqs.block_tables,
                           seqs.schedule, scale)
        return result.view(q.shape)
