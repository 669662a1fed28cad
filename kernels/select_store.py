"""Select each head's kept prompt tokens and store them in its head pages.

Page layout (docs/kv_layout.md): ``pages[block, 0]`` holds K and ``pages[block, 1]``
holds V of ``block_size`` consecutive positions of ONE KV head; head position p
of a head lives at ``slots[h, p] = block * block_size + p % block_size``.

- ``select_sources``: which token each head position holds (PyTorch; the CPU
  engine stores them with vLLM's CPU cache op).
- ``select_and_store_ref``: PyTorch reference.
- ``select_and_store_triton``: two launches, every head in one launch whatever its cap:
  1. one program per head finds its ``cap``-th largest score by a 4-pass radix
     select on the scores' order-preserving integer keys (8 bits a pass), then
     writes the chosen prefix positions in ascending order;
  2. one program per (head, tile of head positions) copies K and V of the chosen
     positions, then of every token from P on, into the head's slots.
- ``select_and_store``: the Triton kernels for CUDA tensors, the reference otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import pow2_at_least, require_launchable


def select_sources(
    scores: torch.Tensor,  # [Hkv, P] float32 window scores of the P = n - w prefix positions
    caps: torch.Tensor,  # [Hkv] int64, prefix tokens each head keeps (clamped to [0, P])
    lengths: torch.Tensor,  # [Hkv] int64, head length after the step: min(cap, P) + (T - P)
    lmax: int,  # >= max(lengths)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which step token each head position holds: ``src[h, p]`` (int64), valid where
    ``valid[h, p]`` (``p < lengths[h]``). Head h holds its top-``caps[h]`` prefix
    positions by score (ties: lower position first) in ascending position, then every
    token from position P on (the window and any generated tokens)."""
    num_heads, prefix = scores.shape
    caps = caps.clamp(0, prefix)
    kmax = min(prefix, lmax)
    # Max-pooling makes plateaus of equal scores; a stable sort breaks ties by the lower position.
    top = scores.sort(dim=-1, descending=True, stable=True).indices[:, :kmax]
    # keep the top caps[h] of each row, ordered by position
    rank_ok = torch.arange(kmax, device=scores.device)[None, :] < caps[:, None]
    chosen = torch.where(rank_ok, top, prefix + lmax).sort(dim=-1).values  # [Hkv, kmax]
    p = torch.arange(lmax, device=scores.device)[None, :]
    from_top = p < caps[:, None]
    picked = chosen.gather(1, p.clamp(max=max(kmax - 1, 0)).expand(num_heads, -1)) if kmax else p
    src = torch.where(from_top, picked, prefix + p - caps[:, None])
    return src, p < lengths[:, None]


def select_and_store_ref(
    scores: torch.Tensor,  # [Hkv, P] float32 window scores of the P = n - w prefix positions
    k: torch.Tensor,  # [T, Hkv, d] keys of the step's tokens for this request (prompt, then generated)
    v: torch.Tensor,  # [T, Hkv, d]
    caps: torch.Tensor,  # [Hkv] int64, prefix tokens each head keeps (clamped to [0, P])
    lengths: torch.Tensor,  # [Hkv] int64, head length after the step: min(cap, P) + (T - P)
    slots: torch.Tensor,  # [Hkv, Lmax] int64, slot of each head position (Lmax >= max(lengths))
    pages: torch.Tensor,  # [num_blocks, 2, block_size, d] one layer's head pages
) -> None:
    """Stores the tokens of ``select_sources`` in each head's slots. A cap above P
    keeps the whole prefix."""
    src, valid = select_sources(scores, caps, lengths, slots.shape[1])
    head = torch.arange(scores.shape[0], device=scores.device)[:, None].expand_as(src)
    src, head, slot = src[valid], head[valid], slots[valid]
    block_size = pages.shape[2]
    blk, off = slot // block_size, slot % block_size
    pages[blk, 0, off] = k[src, head].to(pages.dtype)
    pages[blk, 1, off] = v[src, head].to(pages.dtype)


@triton.jit
def _order_key(x):
    """uint32 keys that sort like the fp32 scores (-0.0 counts as 0.0)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.uint32, bitcast=True)
    negative = (bits >> 31) == 1
    return tl.where(negative, ~bits, bits | 0x80000000)


@triton.jit
def _select_top_prefix(
    scores_ptr,  # [Hkv, P] fp32
    caps_ptr,  # [Hkv] int
    chosen_ptr,  # [Hkv, Lmax] int32 out: positions of the kept prefix tokens, ascending
    prefix, lmax, stride_sh, stride_sp, stride_cap,
    BLOCK: tl.constexpr,
):
    h = tl.program_id(0)
    cap = tl.minimum(tl.maximum(tl.load(caps_ptr + h * stride_cap), 0), prefix).to(tl.int32)
    row = scores_ptr + h.to(tl.int64) * stride_sh
    bins = tl.arange(0, 256)

    # Radix select, most significant byte first: after pass i, `threshold` holds the
    # top 8*(i+1) bits of the cap-th largest key and `need` is how many keys sharing
    # those bits still belong to the top cap.
    threshold = tl.zeros([1], tl.uint32)
    need = tl.zeros([1], tl.int32) + cap
    for i in tl.static_range(4):
        shift = 24 - 8 * i
        hist = tl.zeros([256], tl.int32)
        for start in range(0, prefix, BLOCK):
            pos = start + tl.arange(0, BLOCK)
            key = _order_key(tl.load(row + pos * stride_sp, mask=pos < prefix, other=0.0))
            if i == 0:
                same_high = pos < prefix
            else:
                same_high = (pos < prefix) & ((key >> (shift + 8)) == (threshold >> (shift + 8)))
            hist += tl.histogram(((key >> shift) & 0xFF).to(tl.int32), 256, mask=same_high)
        # at_least[b]: keys (sharing the high bits) whose byte is >= b; non-increasing in b.
        at_least = tl.sum(hist) - tl.cumsum(hist, axis=0) + hist
        digit = tl.sum((at_least >= need).to(tl.int32)) - 1
        above = tl.sum(tl.where(bins == digit, at_least - hist, 0))
        need -= above
        threshold = threshold | (digit.to(tl.uint32) << shift)

    # Keys above the threshold are kept; of the keys equal to it, the first `need`.
    kept_before = tl.zeros([1], tl.int32)
    ties_before = tl.zeros([1], tl.int32)
    for start in range(0, prefix, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        in_range = pos < prefix
        key = _order_key(tl.load(row + pos * stride_sp, mask=in_range, other=0.0))
        tie = (in_range & (key == threshold)).to(tl.int32)
        tie_rank = ties_before + tl.cumsum(tie, axis=0) - tie
        keep = (in_range & (key > threshold)) | ((tie == 1) & (tie_rank < need))
        keep_i = keep.to(tl.int32)
        rank = kept_before + tl.cumsum(keep_i, axis=0) - keep_i
        tl.store(chosen_ptr + h.to(tl.int64) * lmax + rank, pos, mask=keep & (rank < lmax))
        kept_before += tl.sum(keep_i)
        ties_before += tl.sum(tie)


@triton.jit
def _store_head_tokens(
    k_ptr,  # [T, Hkv, d] step tokens
    v_ptr,  # [T, Hkv, d]
    chosen_ptr,  # [Hkv, Lmax] int32 from _select_top_prefix
    caps_ptr,  # [Hkv] int
    lengths_ptr,  # [Hkv] int
    slots_ptr,  # [Hkv, Lmax] int64
    pages_ptr,  # [num_blocks, 2, block_size, d]
    prefix, num_tokens, lmax, head_dim, block_size,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_cap, stride_len, stride_sh, stride_sl,
    stride_pb, stride_pkv, stride_ps, stride_pd,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    h = tl.program_id(0)
    cap = tl.minimum(tl.maximum(tl.load(caps_ptr + h * stride_cap), 0), prefix)
    length = tl.load(lengths_ptr + h * stride_len)
    p = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    valid = (p < length) & (p < lmax)
    from_prefix = p < cap
    chosen = tl.load(chosen_ptr + h.to(tl.int64) * lmax + p, mask=valid & from_prefix, other=0)
    src = tl.where(from_prefix, chosen, prefix + p - cap).to(tl.int64)
    valid = valid & (src < num_tokens)  # lengths beyond min(cap, P) + T - P would read past k
    slot = tl.load(slots_ptr + h.to(tl.int64) * stride_sh + p * stride_sl, mask=valid, other=0).to(tl.int64)
    dst = (pages_ptr + (slot // block_size) * stride_pb + (slot % block_size) * stride_ps)[:, None]
    dd = tl.arange(0, BLOCK_D)[None, :]
    mask = valid[:, None] & (dd < head_dim)
    kt = tl.load(k_ptr + src[:, None] * stride_kt + h * stride_kh + dd * stride_kd, mask=mask)
    vt = tl.load(v_ptr + src[:, None] * stride_vt + h * stride_vh + dd * stride_vd, mask=mask)
    tl.store(dst + dd * stride_pd, kt.to(pages_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_pkv + dd * stride_pd, vt.to(pages_ptr.dtype.element_ty), mask=mask)


_SELECT_BLOCK = 1024  # positions per scan step of the one program per head
_STORE_BLOCK = 32  # head positions per copy program: a [32, d] tile of K and of V


def select_and_store_triton(scores, k, v, caps, lengths, slots, pages) -> None:
    """Same contract as ``select_and_store_ref``. caps, lengths and slots must
    already be on the device (no copies here)."""
    num_heads, prefix = scores.shape
    d = k.shape[2]
    lmax = slots.shape[1]
    if scores.dtype != torch.float32 or k.shape != v.shape or k.shape[1] != num_heads or pages.shape[3] != d:
        raise ValueError(
            f"need fp32 scores [Hkv, P] and k, v [T, Hkv, d] matching pages [.., d]; got scores {scores.dtype} "
            f"{tuple(scores.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, pages {tuple(pages.shape)}"
        )
    require_launchable(_select_top_prefix, scores, k, v, caps, lengths, slots, pages)
    if lmax == 0:
        return
    chosen = torch.empty(num_heads, lmax, dtype=torch.int32, device=k.device)
    if prefix > 0:
        _select_top_prefix[(num_heads,)](scores, caps, chosen, prefix, lmax, *scores.stride(), caps.stride(0),
                                         BLOCK=_SELECT_BLOCK)
    _store_head_tokens[(num_heads, triton.cdiv(lmax, _STORE_BLOCK))](
        k, v, chosen, caps, lengths, slots, pages, prefix, k.shape[0], lmax, d, pages.shape[2],
        *k.stride(), *v.stride(), caps.stride(0), lengths.stride(0), *slots.stride(), *pages.stride(),
        BLOCK_L=_STORE_BLOCK, BLOCK_D=pow2_at_least(d),
    )


def select_and_store(scores, k, v, caps, lengths, slots, pages) -> None:
    """The op the backend calls: Triton for CUDA tensors, the reference otherwise."""
    if k.is_cuda:
        select_and_store_triton(scores, k, v, caps, lengths, slots, pages)
    else:
        select_and_store_ref(scores, k, v, caps, lengths, slots, pages)
