"""Append each head's decode token to its head pages, addressed from the block table.

Head h of sequence b holds ``lengths[b, h]`` tokens including the new one, which
goes to position ``lengths - 1`` (docs/kv_layout.md: page ``(lengths - 1) //
block_size`` of the head, at its canonical row position).

- ``append_decode_kv_ref``: PyTorch reference.
- ``append_decode_kv_triton``: one program per (sequence, KV head).
- ``append_decode_kv``: Triton for CUDA tensors, the reference otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .head_page_rows import head_page_row, head_page_slots
from .triton_common import pow2_at_least, require_launchable


def append_decode_kv_ref(
    k: torch.Tensor,  # [B, Hkv, d] the new token's keys
    v: torch.Tensor,  # [B, Hkv, d]
    pages: torch.Tensor,  # [num_blocks, 2, block_size, d] head pages of one layer
    block_table: torch.Tensor,  # [B, W] int32 block-table rows (canonical page order)
    kept: torch.Tensor,  # [B, Hkv] int prompt tokens each head kept
    lengths: torch.Tensor,  # [B, Hkv] int tokens each head holds including the new one (>= 1)
) -> None:
    block_size = pages.shape[2]
    slot = head_page_slots(block_table, kept, (lengths - 1)[:, :, None], block_size)[:, :, 0]
    pages[slot // block_size, 0, slot % block_size] = k.to(pages.dtype)
    pages[slot // block_size, 1, slot % block_size] = v.to(pages.dtype)


@triton.jit
def _append_token(
    k_ptr,  # [B, Hkv, d]
    v_ptr,  # [B, Hkv, d]
    pages_ptr,  # [num_blocks, 2, block_size, d]
    table_ptr,  # [B, W] int32
    kept_ptr,  # [B, Hkv] int
    lengths_ptr,  # [B, Hkv] int
    head_dim, block_size, num_kv_heads,
    stride_kb, stride_kh, stride_kd, stride_vb, stride_vh, stride_vd,
    stride_pb, stride_pkv, stride_ps, stride_pd,
    stride_tb, stride_tw, stride_keb, stride_keh, stride_lb, stride_lh,
    HKV_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    heads = tl.arange(0, HKV_PAD)
    kept_all = tl.load(kept_ptr + b * stride_keb + heads * stride_keh, mask=heads < num_kv_heads, other=0)
    kept_h = tl.load(kept_ptr + b * stride_keb + h * stride_keh)
    position = tl.load(lengths_ptr + b * stride_lb + h * stride_lh) - 1 + tl.zeros([1], tl.int32)
    row = head_page_row(kept_all, kept_h, h, position // block_size, block_size, num_kv_heads, HKV_PAD)
    block = tl.load(table_ptr + b.to(tl.int64) * stride_tb + row * stride_tw).to(tl.int64)
    dst = pages_ptr + block * stride_pb + (position % block_size) * stride_ps  # [1]
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < head_dim
    kt = tl.load(k_ptr + b * stride_kb + h * stride_kh + dd * stride_kd, mask=d_ok)
    vt = tl.load(v_ptr + b * stride_vb + h * stride_vh + dd * stride_vd, mask=d_ok)
    tl.store(dst + dd * stride_pd, kt.to(pages_ptr.dtype.element_ty), mask=d_ok)
    tl.store(dst + stride_pkv + dd * stride_pd, vt.to(pages_ptr.dtype.element_ty), mask=d_ok)


def append_decode_kv_triton(k, v, pages, block_table, kept, lengths) -> None:
    """Same contract as the reference; every tensor on one device."""
    batch, num_kv_heads, d = k.shape
    if v.shape != k.shape or pages.shape[1] != 2 or pages.shape[3] != d or kept.shape != (batch, num_kv_heads) \
            or lengths.shape != kept.shape or block_table.shape[0] != batch:
        raise ValueError(f"shapes do not fit: k {tuple(k.shape)}, v {tuple(v.shape)}, pages {tuple(pages.shape)}, "
                         f"block_table {tuple(block_table.shape)}, kept {tuple(kept.shape)}, lengths {tuple(lengths.shape)}")
    require_launchable(_append_token, k, v, pages, block_table, kept, lengths)
    if batch == 0:
        return
    _append_token[(batch, num_kv_heads)](
        k, v, pages, block_table, kept, lengths, d, pages.shape[2], num_kv_heads,
        *k.stride(), *v.stride(), *pages.stride(), *block_table.stride(), *kept.stride(), *lengths.stride(),
        HKV_PAD=pow2_at_least(num_kv_heads), BLOCK_D=pow2_at_least(d),
    )


def append_decode_kv(k, v, pages, block_table, kept, lengths) -> None:
    """The op the backend calls: Triton for CUDA tensors, the reference otherwise."""
    if k.is_cuda:
        append_decode_kv_triton(k, v, pages, block_table, kept, lengths)
    else:
        append_decode_kv_ref(k, v, pages, block_table, kept, lengths)
