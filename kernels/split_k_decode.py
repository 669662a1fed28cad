"""Split-K (flash-decoding) attention of one query token per sequence over a
paged KV cache; the Triton core of the decode ops.

One program per (sequence, KV head, split) runs online softmax over its share
of the head's tokens for all query heads of the group at once (so each K/V tile
is read once per group); a second pass merges the splits. Three ways to find the
page of token p of head h of sequence b (``ADDRESSING``):

- SLOTS: ``slots[b, h, p]`` (int64) = block * block_size + offset, head pages.
- HEAD_ROWS: the block-table row of b in the canonical per-head page order
  (docs/kv_layout.md): block = ``row[b, pos(h, p // block_size)]``, head pages.
- DENSE: vLLM's usual page of all heads: block = ``row[b, p // block_size]``.

A token's K is at ``cache + block*s_block + offset*s_pos + h*s_head + i*s_dim``
(``s_head`` = 0 for head pages) and its V ``s_kv`` further.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .head_page_rows import head_page_row
from .triton_common import dot_fp32_acc, num_sms, pow2_at_least, require_launchable, upcast_dot

SLOTS, HEAD_ROWS, DENSE = 0, 1, 2


@triton.jit
def _decode_split(
    q_ptr,  # [B, Hq, d]
    cache_ptr,  # pages of one layer, see module docstring
    index_ptr,  # SLOTS: [B, Hkv, Lmax] int64; HEAD_ROWS, DENSE: [B, W] int32 block table
    kept_ptr,  # HEAD_ROWS: [B, Hkv] int prompt tokens kept per head; else unused
    lengths_ptr,  # [B, Hkv] tokens per head (stride_lh = 0 when all heads share the length)
    out_ptr,  # [B, Hq, d] written when ONE_SPLIT
    part_ptr,  # [B, Hq, S, BLOCK_D + 2] fp32: unnormalised output, running max, sum of exp
    scale, head_dim, block_size, num_kv_heads,
    stride_qb, stride_qh, stride_qd,
    stride_cb, stride_ckv, stride_cs, stride_ch, stride_cd,
    stride_ib, stride_ih, stride_ip,
    stride_kb, stride_kh,
    stride_lb, stride_lh,
    stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HKV_PAD: tl.constexpr, ADDRESSING: tl.constexpr, ONE_SPLIT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    length = tl.load(lengths_ptr + b * stride_lb + h * stride_lh)
    num_tiles = tl.cdiv(length, BLOCK_N)
    per_split = tl.cdiv(num_tiles, num_splits)
    first = split * per_split
    last = tl.minimum(first + per_split, num_tiles)

    g = tl.arange(0, G_PAD)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < head_dim
    q_rows = h * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + q_rows[:, None] * stride_qh + dd[None, :] * stride_qd,
                mask=(g < GROUP)[:, None] & d_ok[None, :], other=0.0)
    if ADDRESSING == 1:
        kept_all = tl.load(kept_ptr + b * stride_kb + tl.arange(0, HKV_PAD) * stride_kh,
                           mask=tl.arange(0, HKV_PAD) < num_kv_heads, other=0)
        kept_h = tl.load(kept_ptr + b * stride_kb + h * stride_kh)
    index_row = index_ptr + b.to(tl.int64) * stride_ib

    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    for t in range(first, last):
        p = t * BLOCK_N + tl.arange(0, BLOCK_N)
        p_ok = p < length
        if ADDRESSING == 0:
            slot = tl.load(index_row + h * stride_ih + p.to(tl.int64) * stride_ip, mask=p_ok, other=0).to(tl.int64)
            block = slot // block_size
            offset = slot % block_size
        else:
            page = p // block_size
            if ADDRESSING == 1:
                page = head_page_row(kept_all, kept_h, h, page, block_size, num_kv_heads, HKV_PAD)
            block = tl.load(index_row + page * stride_ip, mask=p_ok, other=0).to(tl.int64)
            offset = p % block_size
        token = cache_ptr + block * stride_cb + offset * stride_cs + h * stride_ch
        tile_mask = p_ok[:, None] & d_ok[None, :]
        kt = tl.load(token[:, None] + dd[None, :] * stride_cd, mask=tile_mask, other=0.0)
        vt = tl.load(token[:, None] + stride_ckv + dd[None, :] * stride_cd, mask=tile_mask, other=0.0)
        s = dot_fp32_acc(q, tl.trans(kt), UPCAST_DOT) * scale
        s = tl.where(p_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile before num_tiles has a token
        alpha = tl.exp(m - m_new)
        probs = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(probs, axis=1)
        acc = acc * alpha[:, None] + dot_fp32_acc(probs.to(vt.dtype), vt, UPCAST_DOT)
        m = m_new

    if ONE_SPLIT:
        out = out_ptr + b * stride_ob + q_rows[:, None] * stride_oh + dd[None, :] * stride_od
        tl.store(out, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None] & d_ok[None, :])
    else:  # a split past the head's last tile writes nothing; the merge skips it
        row = ((b * tl.num_programs(1) * GROUP + q_rows) * num_splits + split).to(tl.int64) * (BLOCK_D + 2)
        g_ok = g < tl.where(first < last, GROUP, 0)
        tl.store(part_ptr + row[:, None] + dd[None, :], acc, mask=g_ok[:, None])
        tl.store(part_ptr + row + BLOCK_D, m, mask=g_ok)
        tl.store(part_ptr + row + BLOCK_D + 1, l, mask=g_ok)


@triton.jit
def _decode_merge(
    part_ptr,  # [B, Hq, S, BLOCK_D + 2] fp32 from _decode_split
    lengths_ptr,  # [B, Hkv] as for _decode_split
    out_ptr,  # [B, Hq, d]
    num_splits, head_dim,
    stride_lb, stride_lh, stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    # The splits _decode_split gave tiles to (>= 1: every head holds a token).
    num_tiles = tl.cdiv(tl.load(lengths_ptr + b * stride_lb + (hq // GROUP) * stride_lh), BLOCK_N)
    used = tl.cdiv(num_tiles, tl.cdiv(num_tiles, num_splits))
    s = tl.arange(0, SPLITS)
    s_ok = s < used
    dd = tl.arange(0, BLOCK_D)
    row = ((b * tl.num_programs(1) + hq) * num_splits + s).to(tl.int64) * (BLOCK_D + 2)
    m = tl.load(part_ptr + row + BLOCK_D, mask=s_ok, other=float("-inf"))
    l = tl.load(part_ptr + row + BLOCK_D + 1, mask=s_ok, other=0.0)
    acc = tl.load(part_ptr + row[:, None] + dd[None, :], mask=s_ok[:, None], other=0.0)
    m_max = tl.max(m, axis=0)
    weight = tl.exp(m - m_max)  # 0 for the splits not used
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + dd * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=dd < head_dim)


_BLOCK_N = 64  # tokens per tile: K and V tiles of [64, d] 16-bit values per step
_MAX_SPLITS = 128
# Head pages: at most 4 tiles (256 tokens) per program, so that a long head is
# spread over programs instead of finishing last. Dense heads are all equally
# long and split only to fill the device (None).
HEAD_PAGE_TILES_PER_SPLIT = 4


def partials_buffer(shape, device) -> torch.Tensor:
    """Workspace of the splits' partial results (tests fill it with NaN to check
    that no unwritten entry is read)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def num_splits(batch: int, num_kv_heads: int, max_len: int, device: torch.device,
               max_tiles_per_split: int | None) -> int:
    """Splits per head, from shapes only (no host sync): enough programs to fill
    the device and, with ``max_tiles_per_split``, few enough tiles per program that
    the longest head (HeadKV heads differ by 10x and more) is not the tail."""
    tiles = triton.cdiv(max(max_len, 1), _BLOCK_N)
    want = triton.cdiv(4 * num_sms(device), batch * num_kv_heads)
    if max_tiles_per_split:
        want = max(want, triton.cdiv(tiles, max_tiles_per_split))
    return max(1, min(want, tiles, _MAX_SPLITS))


def split_k_decode(
    q: torch.Tensor,  # [B, Hq, d]
    cache: torch.Tensor,  # the layer's pages (any view; addressed through cache_strides)
    cache_strides: tuple[int, int, int, int, int],  # (block, kv, position, head, dim) in elements
    block_size: int,
    num_kv_heads: int,
    index: torch.Tensor,  # SLOTS: [B, Hkv, Lmax] int64; HEAD_ROWS, DENSE: [B, W] int32
    kept: torch.Tensor | None,  # HEAD_ROWS: [B, Hkv] int
    lengths: torch.Tensor,  # [B, Hkv] or, for DENSE, [B] int (>= 1)
    max_len: int,  # an upper bound of the lengths (from shapes: sizes the split count)
    scale: float,
    addressing: int,
    max_tiles_per_split: int | None,
) -> torch.Tensor:
    batch, num_q_heads, d = q.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if q.dtype != cache.dtype:
        raise ValueError(f"q is {q.dtype} but the KV cache is {cache.dtype}")
    tensors = [q, cache, index, lengths] + ([kept] if kept is not None else [])
    require_launchable(_decode_split, *tensors)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    group = num_q_heads // num_kv_heads
    block_d = pow2_at_least(d, 16)  # tl.dot needs K >= 16
    splits = num_splits(batch, num_kv_heads, max_len, q.device, max_tiles_per_split)
    part = partials_buffer((batch, num_q_heads, splits, block_d + 2), q.device) if splits > 1 else out
    if addressing == SLOTS:
        index_strides = index.stride()
    else:
        index_strides = (index.stride(0), 0, index.stride(1))
    kept_strides = kept.stride() if kept is not None else (0, 0)
    length_strides = lengths.stride() if lengths.dim() == 2 else (lengths.stride(0), 0)
    _decode_split[(batch, num_kv_heads, splits)](
        q, cache, index, kept if kept is not None else lengths, lengths, out, part,
        scale, d, block_size, num_kv_heads,
        *q.stride(), *cache_strides, *index_strides, *kept_strides, *length_strides, *out.stride(),
        GROUP=group, G_PAD=pow2_at_least(group, 16), BLOCK_N=_BLOCK_N, BLOCK_D=block_d,
        HKV_PAD=pow2_at_least(num_kv_heads), ADDRESSING=addressing, ONE_SPLIT=splits == 1,
        UPCAST_DOT=upcast_dot(_decode_split, q.dtype),
    )
    if splits > 1:
        _decode_merge[(batch, num_q_heads)](part, lengths, out, splits, d, *length_strides, *out.stride(),
                                            GROUP=group, SPLITS=pow2_at_least(splits), BLOCK_N=_BLOCK_N,
                                            BLOCK_D=block_d)
    return out
