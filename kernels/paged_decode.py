"""Decode attention over per-head pages, addressed by a padded slot table.

- ``paged_decode_ref``: PyTorch reference.
- ``paged_decode_triton``: the split-K kernel of ``split_k_decode`` (SLOTS).
- ``paged_decode``: Triton for CUDA tensors, the reference otherwise.
"""

from __future__ import annotations

import torch

from .split_k_decode import HEAD_PAGE_TILES_PER_SPLIT, SLOTS, split_k_decode


def paged_decode_ref(
    q: torch.Tensor,  # [B, Hq, d] one query token per sequence
    pages: torch.Tensor,  # [num_blocks, 2, block_size, d] head pages (K, V) of one layer
    slots: torch.Tensor,  # [B, Hkv, Lmax] int64 slot of each head position (any value past the length)
    lengths: torch.Tensor,  # [B, Hkv] int64 tokens each head holds (>= 1)
    scale: float,
) -> torch.Tensor:
    """Returns [B, Hq, d]: query head q attends its KV head q // (Hq / Hkv) over
    that head's ``lengths`` tokens. Softmax in fp32."""
    batch, num_q_heads, d = q.shape
    num_kv_heads, lmax = slots.shape[1], slots.shape[2]
    group = num_q_heads // num_kv_heads
    block_size = pages.shape[2]
    blk, off = slots // block_size, slots % block_size
    keys = pages[blk, 0, off].float()  # [B, Hkv, Lmax, d]
    values = pages[blk, 1, off].float()
    logits = torch.einsum("bkgd,bkld->bkgl", q.float().view(batch, num_kv_heads, group, d), keys) * scale
    valid = torch.arange(lmax, device=q.device)[None, None, :] < lengths[:, :, None]
    logits.masked_fill_(~valid[:, :, None, :], float("-inf"))
    out = torch.einsum("bkgl,bkld->bkgd", logits.softmax(dim=-1), values)
    return out.reshape(batch, num_q_heads, d).to(q.dtype)


def paged_decode_triton(q, pages, slots, lengths, scale: float) -> torch.Tensor:
    """Same contract as ``paged_decode_ref``; slots and lengths on q's device."""
    num_blocks, two, block_size, d = pages.shape
    if two != 2 or q.shape[2] != d or slots.shape[:2] != lengths.shape or slots.shape[0] != q.shape[0]:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, pages {tuple(pages.shape)}, "
                         f"slots {tuple(slots.shape)}, lengths {tuple(lengths.shape)}")
    s_block, s_kv, s_pos, s_dim = pages.stride()
    return split_k_decode(q, pages, (s_block, s_kv, s_pos, 0, s_dim), block_size, slots.shape[1],
                          slots, None, lengths, slots.shape[2], scale, SLOTS, HEAD_PAGE_TILES_PER_SPLIT)


def paged_decode(q, pages, slots, lengths, scale: float) -> torch.Tensor:
    """The op the backend calls: Triton for CUDA tensors, the reference otherwise."""
    if q.is_cuda:
        return paged_decode_triton(q, pages, slots, lengths, scale)
    return paged_decode_ref(q, pages, slots, lengths, scale)
