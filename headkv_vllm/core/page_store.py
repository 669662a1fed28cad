"""Page stores: how tokens are written into head pages and how queries attend over
them (docs/kv_layout.md). One store is chosen when the engine starts:

- ``BlockTablePageStore`` (here): the CUDA route. Every op reads the layer's
  block-table rows and the plan's ``kept``/``lengths`` on the device and finds
  each head's pages itself (``kernels/head_page_rows``), so a layer costs kernel
  launches only: no host work, no host-device sync.
- ``headkv_vllm.engine.cpu_page_store.CpuPageStore``: the CPU route, over vLLM's
  CPU cache and attention ops (their K packing is ISA-specific, so pages written
  by one store are read only by the same store).

A store's ``layer_state`` runs in the metadata builder, once per layer per step;
the other methods run in the layer's forward.

Each store chooses its kernels once, when it is made (``KernelOps``): the Triton
launchers, or their PyTorch references of the same signature. The block-table store
takes Triton on CUDA and the references elsewhere, unless told (``use_triton=True``
on the CPU runs the Triton kernels in Triton's interpreter, ``TRITON_INTERPRET=1``);
the CPU store's only kernel, the window scores, is the reference. The layer runs the
store's ``ops`` too, so one store never mixes the two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from headkv_vllm.core.plan import PrefillPlan, StepPlan
from headkv_vllm.core.prompt_attention import PromptAttention, sdpa_prefill
from headkv_vllm.kernels import append_decode_kv as _append
from headkv_vllm.kernels import paged_decode_block_table as _decode
from headkv_vllm.kernels import select_store as _select
from headkv_vllm.kernels import window_scores as _scores
from headkv_vllm.kernels.head_page_rows import head_page_slots


@dataclass(frozen=True)
class KernelOps:
    """The kernels of one page store and its layers, all Triton or all PyTorch
    references (``headkv_vllm.kernels``: same signatures, docstrings there)."""

    triton: bool
    window_scores: Callable[..., torch.Tensor]
    select_and_store: Callable[..., None]
    append_decode_kv: Callable[..., None]
    paged_decode_block_table: Callable[..., torch.Tensor]

    @classmethod
    def choose(cls, triton: bool) -> "KernelOps":
        suffix = "_triton" if triton else "_ref"
        return cls(triton, getattr(_scores, "window_scores" + suffix), getattr(_select, "select_and_store" + suffix),
                   getattr(_append, "append_decode_kv" + suffix),
                   getattr(_decode, "paged_decode_block_table" + suffix))


class PageStore(Protocol):
    ops: KernelOps  # the kernels the store and its layers run (window scores included)

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
    kept: torch.Tensor  # [R, Hkv] int32 plan.layout.kept[layer]
    lengths: torch.Tensor  # [R, Hkv] int32 plan.layout.lengths[layer]
    decode_table: torch.Tensor  # [D, W] rows of the decodes
    decode_kept: torch.Tensor  # [D, Hkv]
    decode_lengths: torch.Tensor  # [D, Hkv]
    decode_max_len: int


class BlockTablePageStore:
    def __init__(self, block_size: int, device: torch.device | str, use_triton: bool | None = None,
                 prompt_attention: PromptAttention = sdpa_prefill):
        """``device``: where the pages live. ``use_triton``: None = the Triton kernels on
        CUDA, the references elsewhere; True or False = those kernels on any device (True
        on the CPU needs TRITON_INTERPRET=1)."""
        self.block_size = block_size
        self.ops = KernelOps.choose(torch.device(device).type == "cuda" if use_triton is None else use_triton)
        self.attend_prompts = prompt_attention

    def layer_state(self, plan: StepPlan, layer: int, block_table: torch.Tensor) -> BlockTableLayer:
        layout, decode = plan.layout, plan.decode
        kept, lengths = layout.kept[layer], layout.lengths[layer]
        rows = block_table
        if layout.has_offsets:
            # Rows of chunked prompts start with null entries: the kernels read the rows past them,
            # up to the most pages a row holds. TODO(perf): an offset argument in the kernels.
            (num_rows, num_heads), width = kept.shape, block_table.shape[1]
            used = min(width, num_heads * layout.max_pages)
            index = torch.arange(used, device=block_table.device)[None, :] + layout.offsets[layer][:, None].long()
            block_table = block_table[:num_rows].gather(1, index.clamp_(max=width - 1))
        if decode.req_span is not None:  # the usual case: views, no copy of table rows
            a, b = decode.req_span
            table, d_kept, d_lengths = block_table[a:b], kept[a:b], lengths[a:b]
        else:
            d = decode.reqs
            table, d_kept, d_lengths = block_table.index_select(0, d), kept.index_select(0, d), lengths.index_select(0, d)
        return BlockTableLayer(
            rows=rows, block_table=block_table, kept=kept, lengths=lengths, decode_table=table, decode_kept=d_kept,
            decode_lengths=d_lengths, decode_max_len=decode.max_len,
        )

    def store_prefill(self, state: BlockTableLayer, pf: PrefillPlan, scores, k, v, pages) -> None:
        r = pf.row
        positions = torch.arange(pf.max_len, device=k.device)
        slots = head_page_slots(state.block_table[r : r + 1], state.kept[r : r + 1], positions, self.block_size)[0]
        caps = (state.kept[r].clamp(max=pf.prompt_len) - pf.window).long()
        lengths = state.lengths[r].long()
        self.ops.select_and_store(scores, k, v, caps, lengths, slots, pages)

    def append_decode(self, state: BlockTableLayer, k, v, pages) -> None:
        self.ops.append_decode_kv(k, v, pages, state.decode_table, state.decode_kept, state.decode_lengths)

    def attend_decode(self, state: BlockTableLayer, q, pages, scale: float) -> torch.Tensor:
        return self._attend(q, pages, state.decode_table, state.decode_kept, state.decode_lengths, scale,
                            state.decode_max_len)

    def append_tokens(self, state: BlockTableLayer, pf: PrefillPlan, k, v, pages) -> None:
        table, kept, lengths = self._generated_rows(state, pf, k.device)
        self.ops.append_decode_kv(k, v, pages, table, kept, lengths)

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
        return self.ops.paged_decode_block_table(q, pages, table, kept, lengths, scale, max_len)
