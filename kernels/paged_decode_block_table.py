"""Decode attention over per-head pages, addressed straight from the block table.

The GPU-friendly form of ``paged_decode``: instead of a padded ``[B, Hkv, Lmax]``
slot table built on the host every step, it takes the request's block-table row
(already on the device) and what each head kept of the prompt, and finds page j
of head h at row position ``pos(h, j)`` of the canonical page order
(docs/kv_layout.md; ``head_page_rows``).

- ``paged_decode_block_table_ref``: PyTorch reference (builds the slot table).
- ``paged_decode_block_table_triton``: the split-K kernel (HEAD_ROWS).
- ``paged_decode_block_table``: Triton for CUDA tensors, the reference otherwise.
"""

from __future__ import annotations

import torch

from .head_page_rows import head_page_slots
from .paged_decode import paged_decode_ref
from .split_k_decode import HEAD_PAGE_TILES_PER_SPLIT, HEAD_ROWS, split_k_decode


def paged_decode_block_table_ref(
    q: torch.Tensor,  # [B, Hq, d] one query token per sequence
    pages: torch.Tensor,  # [num_blocks, 2, block_size, d] head pages (K, V) of one layer
    block_table: torch.Tensor,  # [B, W] int32 block-table rows of the layer (canonical page order)
    kept: torch.Tensor,  # [B, Hkv] int prompt tokens each head kept (Budgets.kept, <= prompt length)
    lengths: torch.Tensor,  # [B, Hkv] int tokens each head holds now (>= 1)
    scale: float,
    max_len: int | None = None,  # >= every length, known on the host (sizes the Triton grid)
) -> torch.Tensor:
    """Returns [B, Hq, d], as ``paged_decode_ref`` over the slots the row gives."""
    lmax = int(lengths.max()) if lengths.numel() else 0
    slots = head_page_slots(block_table, kept, torch.arange(lmax, device=q.device), pages.shape[2])
    return paged_decode_ref(q, pages, slots, lengths, scale)


def paged_decode_block_table_triton(q, pages, block_table, kept, lengths, scale: float,
                                    max_len: int | None = None) -> torch.Tensor:
    """Same contract as the reference; every tensor on q's device. No host sync.
    Without ``max_len`` the grid is sized for heads as long as a whole row, and
    most of its programs find nothing to do."""
    num_blocks, two, block_size, d = pages.shape
    batch, num_kv_heads = kept.shape
    if two != 2 or q.shape[2] != d or lengths.shape != kept.shape or block_table.shape[0] != batch or q.shape[0] != batch:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, pages {tuple(pages.shape)}, block_table "
                         f"{tuple(block_table.shape)}, kept {tuple(kept.shape)}, lengths {tuple(lengths.shape)}")
    s_block, s_kv, s_pos, s_dim = pages.stride()
    if max_len is None:
        max_len = block_table.shape[1] * block_size  # a head holds at most the whole row
    return split_k_decode(q, pages, (s_block, s_kv, s_pos, 0, s_dim), block_size, num_kv_heads,
                          block_table, kept, lengths, max_len, scale, HEAD_ROWS, HEAD_PAGE_TILES_PER_SPLIT)


def paged_decode_block_table(q, pages, block_table, kept, lengths, scale: float,
                             max_len: int | None = None) -> torch.Tensor:
    """The op the backend calls: Triton for CUDA tensors, the reference otherwise."""
    if q.is_cuda:
        return paged_decode_block_table_triton(q, pages, block_table, kept, lengths, scale, max_len)
    return paged_decode_block_table_ref(q, pages, block_table, kept, lengths, scale, max_len)
