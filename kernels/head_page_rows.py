"""Where a head's page sits in a request's block-table row (docs/kv_layout.md,
"Page tables", invariant 2), in PyTorch and as a Triton function kernels call:

    pos(h, j) = sum_h' max(0, ceil((j*bs - kept[h] + kept[h'] + [h' < h]) / bs))

``kept[h]`` is what head h kept of the prompt. Written here independently of
``headkv_vllm.method.layout`` so that the kernel tests cross-check the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def head_page_slots(block_table: torch.Tensor, kept: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """block_table: [B, W] int block-table rows; kept: [B, Hkv] int; positions: head
    positions, [L] or [B, Hkv, L] int.

    Returns slots [B, Hkv, L] int64 (positions whose page lies past the row's width
    get slot 0..block_size-1 of block 0; mask them by length)."""
    num_heads = kept.shape[1]
    positions = positions.expand(kept.shape[0], num_heads, positions.shape[-1])
    key = (positions // block_size) * block_size - kept[:, :, None]  # [B, H, L]
    h_idx = torch.arange(num_heads, device=kept.device)
    earlier = (h_idx[None, :] < h_idx[:, None]).long()  # [h, h'] = h' < h
    t = key[:, :, :, None] + kept[:, None, None, :] + earlier[None, :, None, :]  # [B, H, L, H']
    pos = torch.where(t > 0, (t + block_size - 1) // block_size, 0).sum(-1)
    inside = pos < block_table.shape[1]
    blocks = block_table.long().gather(1, pos.clamp(max=block_table.shape[1] - 1).flatten(1)).view(pos.shape)
    blocks = torch.where(inside, blocks, 0)
    return blocks * block_size + positions % block_size


@triton.jit
def head_page_row(kept_all, kept_h, h, page, block_size, num_kv_heads, HKV_PAD: tl.constexpr):
    """Row position of page ``page`` ([N] int) of head ``h``; ``kept_all``: [HKV_PAD]
    kept of every head of the request (padding ignored), ``kept_h`` = kept_all[h]."""
    others = tl.arange(0, HKV_PAD)
    t = (page * block_size - kept_h)[:, None] + kept_all[None, :] + (others < h).to(tl.int32)[None, :]
    count = tl.where((t > 0) & (others < num_kv_heads)[None, :], (t + block_size - 1) // block_size, 0)
    return tl.sum(count, axis=1)
