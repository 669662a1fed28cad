"""Page stores: how tokens are written into head pages and how queries attend over
them (docs/kv_layout.md). One store is chosen when the engine starts:

- ``BlockTablePageStore`` (here): the CUDA route. Every op reads the layer's
  block-table rows and the plan's ``kept``/``lengths`` on the device and finds
  each head's pages itself (``kernels/head_page_rows``), so a layer costs kernel
  launches only: no host work, no host-device sync. With CUDA tensors the ops are
  the Triton kernels; with CPU tensors they are the kernels' PyTorch references of
  the same signature, or, with ``use_triton=True`` under ``TRITON_INTERPRET=1``,
  the Triton kernels in Triton's interpreter.
- ``headkv_vllm.engine.cpu_page_store.CpuPageStore``: the CPU route, over vLLM's
  CPU cache and attention ops (their K packing is ISA-specific, so pages written
  by one store are read only by the same store).

A store's ``layer_state`` runs in the metadata builder, once per layer per step;
the other methods run in the layer's forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from headkv_vllm.core.plan import PrefillPlan, StepPlan
from headkv_vllm.core.prompt_attention import PromptAttention, sdpa_prefill
from headkv_vllm.kernels import append_decode_kv as _append
from headkv_vllm.kernels import paged_decode_block_table as _decode
from headkv_vllm.kernels import select_store as _select
from headkv_vllm.kernels.head_page_rows import head_page_slots


class PageStore(Protocol):
    # Which kernels the layer's other ops (window scores) use with this store: None =
    # Triton for CUDA tensors, the PyTorch references otherwise; True = always Triton.
    use_triton: bool | None

    def attend_prompts(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: StepPlan,
                       scale: float) -> torch.Tensor:
        """Causal attention of every prefill over its whole prompt, the prompts packed
        (``core.prompt_attention``)."""

    def layer_state(self, plan: StepPlan, layer: int, block_table: torch.Tensor) -> object:
        """Whatever the store needs per layer and step (built by the metadata builder)."""

    def store_prefill(self, state, pf: PrefillPlan, scores: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      pages: torch.Tensor) -> None:
        """Keep each head's top prefix tokens by ``scores`` ``[Hkv, P]`` plus the window and any
        recomputed generated tokens: ``k``/``v`` ``[T, Hkv, d]`` are the request's step tokens."""

    def append_decode(self, state, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor) -> None:
        """Append the decode tokens' ``k``/``v`` ``[D, Hkv, d]`` to every head."""

    def append_tokens(self, state, pf: PrefillPlan, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor) -> None:
        """Append a recomputed request's generated tokens ``k``/``v`` ``[g, Hkv, d]`` (a step
        after its compressed prompt) to every head."""

    def attend_decode(self, state, q: torch.Tensor, pages: torch.Tensor, scale: float) -> torch.Tensor:
        """``q`` ``[D, Hq, d]`` over each decode's head pages -> ``[D, Hq, d]``."""

    def attend_recomputed(self, state, pf: PrefillPlan, q: torch.Tensor, pages: torch.Tensor,
                          scale: float) -> torch.Tensor:
        """The generated tokens of a recomputed request computed in the step (``pf.new_generated``),
        ``q`` ``[g, Hq, d]``: token j sees the compressed prompt and the generated tokens up to
        itself, as when first decoded."""


@dataclass(frozen=True)
class BlockTableLayer:
    rows: torch.Tensor  # [R, W] int32 the layer's block-table rows as vLLM holds them
    block_table: torch.Tensor  # [R, W] int32 the canonical rows: past each row's leading nulls
    kept: torch.Tensor  # [R, Hkv] int32 plan.kept[layer]
    lengths: torch.Tensor  # [R, Hkv] int32 plan.lengths[layer]
    decode_table: torch.Tensor  # [D, W] rows of the decodes
    decode_kept: torch.Tensor  # [D, Hkv]
    decode_lengths: torch.Tensor  # [D, Hkv]
    decode_max_len: int


class BlockTablePageStore:
    def __init__(self, block_size: int, use_triton: bool | None = None,
                 prompt_attention: PromptAttention = sdpa_prefill):
        """``use_triton``: None = the Triton kernels for CUDA tensors and the references
        otherwise; True = always the Triton launchers (CPU tensors need TRITON_INTERPRET=1)."""
        self.block_size = block_size
        self.use_triton = use_triton
        self.attend_prompts = prompt_attention

    def _triton(self, t: torch.Tensor) -> bool:
        return t.is_cuda if self.use_triton is None else self.use_triton

    def layer_state(self, plan: StepPlan, layer: int, block_table: torch.Tensor) -> BlockTableLayer:
        kept, lengths = plan.kept[layer], plan.lengths[layer]
        rows = block_table
        if plan.has_offsets:
            # Rows of chunked prompts start with null entries: the kernels read the rows past them,
            # up to the most pages a row holds. TODO(perf): an offset argument in the kernels.
            (num_rows, num_heads), width = kept.shape, block_table.shape[1]
            used = min(width, num_heads * plan.max_pages)
            index = torch.arange(used, device=block_table.device)[None, :] + plan.offsets[layer][:, None].long()
            block_table = block_table[:num_rows].gather(1, index.clamp_(max=width - 1))
        if plan.decode_req_span is not None:  # the usual case: views, no copy of table rows
            a, b = plan.decode_req_span
            table, d_kept, d_lengths = block_table[a:b], kept[a:b], lengths[a:b]
        else:
            d = plan.decode_reqs
            table, d_kept, d_lengths = block_table.index_select(0, d), kept.index_select(0, d), lengths.index_select(0, d)
        return BlockTableLayer(
            rows=rows, block_table=block_table, kept=kept, lengths=lengths, decode_table=table, decode_kept=d_kept,
            decode_lengths=d_lengths, decode_max_len=plan.decode_max_len,
        )

    def store_prefill(self, state: BlockTableLayer, pf: PrefillPlan, scores, k, v, pages) -> None:
        r = pf.row
        positions = torch.arange(pf.max_len, device=k.device)
        slots = head_page_slots(state.block_table[r : r + 1], state.kept[r : r + 1], positions, self.block_size)[0]
        caps = (state.kept[r].clamp(max=pf.prompt_len) - pf.window).long()
        lengths = state.lengths[r].long()
        op = _select.select_and_store_triton if self._triton(k) else _select.select_and_store_ref
        op(scores, k, v, caps, lengths, slots, pages)

    def append_decode(self, state: BlockTableLayer, k, v, pages) -> None:
        op = _append.append_decode_kv_triton if self._triton(k) else _append.append_decode_kv_ref
        op(k, v, pages, state.decode_table, state.decode_kept, state.decode_lengths)

    def attend_decode(self, state: BlockTableLayer, q, pages, scale: float) -> torch.Tensor:
        return self._attend(q, pages, state.decode_table, state.decode_kept, state.decode_lengths, scale,
                            state.decode_max_len)

    def append_tokens(self, state: BlockTableLayer, pf: PrefillPlan, k, v, pages) -> None:
        table, kept, lengths = self._generated_rows(state, pf, k.device)
        op = _append.append_decode_kv_triton if self._triton(k) else _append.append_decode_kv_ref
        op(k, v, pages, table, kept, lengths)

    def attend_recomputed(self, state: BlockTableLayer, pf: PrefillPlan, q, pages, scale: float) -> torch.Tensor:
        table, kept, lengths = self._generated_rows(state, pf, q.device)
        return self._attend(q, pages, table, kept, lengths, scale, pf.max_len)

    @staticmethod
    def _generated_rows(state: BlockTableLayer, pf: PrefillPlan, device):
        """The step's generated tokens of a recomputed request as decode rows: token j holds the
        prompt part and the generated tokens up to itself."""
        r, g = pf.row, pf.new_generated
        step = torch.arange(1 - g, 1, device=device, dtype=state.lengths.dtype)[:, None]  # [g, 1]
        return state.block_table[r].expand(g, -1), state.kept[r].expand(g, -1), state.lengths[r][None, :] + step

    def _attend(self, q, pages, table, kept, lengths, scale, max_len) -> torch.Tensor:
        op = _decode.paged_decode_block_table_triton if self._triton(q) else _decode.paged_decode_block_table_ref
        return op(q, pages, table, kept, lengths, scale, max_len)
