"""Decode attention over per-head pages: one query token per sequence."""

from __future__ import annotations

import torch


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
