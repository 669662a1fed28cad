"""Window scores of SnapKV/HeadKV for one prompt, per KV head (docs/method.md s.3).

- ``window_scores_ref``: PyTorch reference (materialises [Hq, w, n] logits).
- ``window_scores_triton``: Triton, tiles over the keys; three launches:
  1. per (KV head, split of the keys): running max and sum of exp of each window
     row's logits (causal inside the window);
  2. per (KV head, tile of prefix keys): combine the splits into each row's
     log-sum-exp, recompute the tile's logits, average the probabilities;
  3. max-pool over positions.
- ``window_scores``: the Triton kernel for CUDA tensors, the reference otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_common import dot_fp32_acc, num_sms, pow2_at_least, require_launchable, upcast_dot


def window_scores_ref(q_win: torch.Tensor, k: torch.Tensor, scale: float, pool_kernel: int) -> torch.Tensor:
    """q_win: [w, Hq, d] the prompt's last w queries; k: [n, Hkv, d] the prompt's keys (n >= w).

    Returns [Hkv, n - w] float32: softmax(q k^T * scale) in fp32 over all n keys,
    causal inside the window, averaged over the window queries and the query heads
    of each KV head's group, restricted to prefix positions, then max-pooled
    (kernel ``pool_kernel``, stride 1, same padding).
    """
    w, num_q_heads, _ = q_win.shape
    n, num_kv_heads, _ = k.shape
    group = num_q_heads // num_kv_heads
    qg = q_win.float().view(w, num_kv_heads, group, -1)
    logits = torch.einsum("wkgd,nkd->kgwn", qg, k.float()) * scale
    causal = torch.arange(n, device=k.device)[None, :] > torch.arange(n - w, n, device=k.device)[:, None]
    logits.masked_fill_(causal, float("-inf"))
    attn = logits.softmax(dim=-1)[..., : n - w].mean(dim=(1, 2))  # [Hkv, n - w]
    if n - w == 0:
        return attn
    return F.max_pool1d(attn[:, None, :], pool_kernel, stride=1, padding=pool_kernel // 2)[:, 0, :]


@triton.jit
def _load_window_queries(q_ptr, h, w, head_dim, stride_qw, stride_qh, stride_qd,
                         GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # Row r is window query r // GROUP of query head h * GROUP + r % GROUP.
    rows = tl.arange(0, ROWS)
    dd = tl.arange(0, BLOCK_D)
    ptrs = (q_ptr + (rows // GROUP)[:, None].to(tl.int64) * stride_qw
            + (h * GROUP + rows % GROUP)[:, None] * stride_qh + dd[None, :] * stride_qd)
    return tl.load(ptrs, mask=(rows < w * GROUP)[:, None] & (dd < head_dim)[None, :], other=0.0)


@triton.jit
def _key_tile_logits(q, k_ptr, h, keys, n, head_dim, scale, stride_kn, stride_kh, stride_kd,
                     BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """[ROWS, BLOCK_N] fp32 logits of the window rows against keys ``keys``."""
    dd = tl.arange(0, BLOCK_D)
    ptrs = k_ptr + keys[:, None].to(tl.int64) * stride_kn + h * stride_kh + dd[None, :] * stride_kd
    kt = tl.load(ptrs, mask=(keys < n)[:, None] & (dd < head_dim)[None, :], other=0.0)
    return dot_fp32_acc(q, tl.trans(kt), UPCAST_DOT) * scale


@triton.jit
def _window_lse_partial(
    q_ptr,  # [w, Hq, d] window queries
    k_ptr,  # [n, Hkv, d] prompt keys
    m_ptr,  # [Hkv, S, ROWS] fp32 out: max logit of each row over the split's keys
    l_ptr,  # [Hkv, S, ROWS] fp32 out: sum of exp(logit - max)
    n, w, head_dim, scale, tiles_per_split,
    stride_qw, stride_qh, stride_qd, stride_kn, stride_kh, stride_kd,
    GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    h = tl.program_id(0)
    split = tl.program_id(1)
    q = _load_window_queries(q_ptr, h, w, head_dim, stride_qw, stride_qh, stride_qd, GROUP, ROWS, BLOCK_D)
    rows = tl.arange(0, ROWS)
    last_key = n - w + rows // GROUP  # causal: row r sees keys <= its own position
    m_run = tl.full([ROWS], float("-inf"), tl.float32)
    l_run = tl.zeros([ROWS], tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(n, BLOCK_N))
    for t in range(first, last):
        keys = t * BLOCK_N + tl.arange(0, BLOCK_N)
        logits = _key_tile_logits(q, k_ptr, h, keys, n, head_dim, scale, stride_kn, stride_kh, stride_kd,
                                  BLOCK_D, UPCAST_DOT)
        logits = tl.where(keys[None, :] <= last_key[:, None], logits, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row may see no key of this split yet
        l_run = l_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
        m_run = m_new
    out = (h * tl.num_programs(1) + split) * ROWS + rows
    tl.store(m_ptr + out, m_run)
    tl.store(l_ptr + out, l_run)


@triton.jit
def _window_prefix_scores(
    q_ptr,  # [w, Hq, d]
    k_ptr,  # [n, Hkv, d]
    m_ptr,  # [Hkv, S, ROWS] fp32 from _window_lse_partial
    l_ptr,  # [Hkv, S, ROWS] fp32
    out_ptr,  # [Hkv, n - w] fp32 out: mean probability of each prefix key
    n, w, head_dim, scale, num_splits,
    stride_qw, stride_qh, stride_qd, stride_kn, stride_kh, stride_kd,
    GROUP: tl.constexpr, ROWS: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    h = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    splits = tl.arange(0, SPLITS)
    part = (h * num_splits + splits[:, None]) * ROWS + rows[None, :]
    part_ok = (splits < num_splits)[:, None]
    m = tl.load(m_ptr + part, mask=part_ok, other=float("-inf"))
    l = tl.load(l_ptr + part, mask=part_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # padding rows
    lse = m_max + tl.log(tl.sum(l * tl.exp(m - m_max[None, :]), axis=0))

    q = _load_window_queries(q_ptr, h, w, head_dim, stride_qw, stride_qh, stride_qd, GROUP, ROWS, BLOCK_D)
    prefix = n - w
    keys = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    logits = _key_tile_logits(q, k_ptr, h, keys, n, head_dim, scale, stride_kn, stride_kh, stride_kd,
                              BLOCK_D, UPCAST_DOT)
    # Every window row sees every prefix key, so no causal mask here.
    probs = tl.where((rows < w * GROUP)[:, None], tl.exp(logits - lse[:, None]), 0.0)
    mean = tl.sum(probs, axis=0) / (w * GROUP)
    tl.store(out_ptr + h.to(tl.int64) * prefix + keys, mean, mask=keys < prefix)


@triton.jit
def _max_pool_rows(
    x_ptr,  # [Hkv, P] fp32
    out_ptr,  # [Hkv, P] fp32 out
    length,
    POOL: tl.constexpr, BLOCK: tl.constexpr,
):
    h = tl.program_id(0)
    pos = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = h.to(tl.int64) * length
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    for o in tl.static_range(POOL):
        src = pos + (o - POOL // 2)
        x = tl.load(x_ptr + row + src, mask=(src >= 0) & (src < length), other=float("-inf"))
        best = tl.maximum(best, x)
    tl.store(out_ptr + row + pos, best, mask=pos < length)


_BLOCK_N = 64  # keys per tile: a [ROWS, 64] fp32 logit tile stays in registers
_POOL_BLOCK = 256


def window_scores_triton(q_win: torch.Tensor, k: torch.Tensor, scale: float, pool_kernel: int) -> torch.Tensor:
    """Same contract as ``window_scores_ref``; never materialises more than a
    [w * group, 64] logit tile per program."""
    w, num_q_heads, d = q_win.shape
    n, num_kv_heads, dk = k.shape
    if dk != d or q_win.dtype != k.dtype:
        raise ValueError(f"q_win {tuple(q_win.shape)} {q_win.dtype} and k {tuple(k.shape)} {k.dtype} must share head_dim and dtype")
    if num_q_heads % num_kv_heads or not 1 <= w <= n:
        raise ValueError(f"need Hq % Hkv == 0 and 1 <= w <= n; got Hq={num_q_heads}, Hkv={num_kv_heads}, w={w}, n={n}")
    if pool_kernel < 1 or pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be odd and >= 1 (same-length output), got {pool_kernel}")
    prefix = n - w
    out = torch.empty(num_kv_heads, prefix, dtype=torch.float32, device=k.device)
    if prefix == 0:
        return out
    require_launchable(_window_lse_partial, q_win, k)
    group = num_q_heads // num_kv_heads
    rows = pow2_at_least(w * group, 16)  # tl.dot needs >= 16 rows
    block_d = pow2_at_least(d, 16)
    num_tiles = triton.cdiv(n, _BLOCK_N)
    # Enough programs to fill the device, each over whole tiles.
    splits = min(num_tiles, triton.cdiv(2 * num_sms(k.device), num_kv_heads), 64)
    tiles_per_split = triton.cdiv(num_tiles, splits)
    splits = triton.cdiv(num_tiles, tiles_per_split)
    m = torch.empty(num_kv_heads, splits, rows, dtype=torch.float32, device=k.device)
    l = torch.empty_like(m)
    common = dict(GROUP=group, ROWS=rows, BLOCK_N=_BLOCK_N, BLOCK_D=block_d, UPCAST_DOT=upcast_dot(_window_lse_partial, q_win.dtype))
    strides = (*q_win.stride(), *k.stride())
    _window_lse_partial[(num_kv_heads, splits)](q_win, k, m, l, n, w, d, scale, tiles_per_split, *strides, **common)
    raw = out if pool_kernel == 1 else torch.empty_like(out)
    _window_prefix_scores[(num_kv_heads, triton.cdiv(prefix, _BLOCK_N))](
        q_win, k, m, l, raw, n, w, d, scale, splits, *strides, SPLITS=pow2_at_least(splits), **common)
    if pool_kernel > 1:
        _max_pool_rows[(num_kv_heads, triton.cdiv(prefix, _POOL_BLOCK))](raw, out, prefix, POOL=pool_kernel, BLOCK=_POOL_BLOCK)
    return out


def window_scores(q_win: torch.Tensor, k: torch.Tensor, scale: float, pool_kernel: int) -> torch.Tensor:
    """The op the backend calls: Triton for CUDA tensors, the reference otherwise."""
    if k.is_cuda:
        return window_scores_triton(q_win, k, scale, pool_kernel)
    return window_scores_ref(q_win, k, scale, pool_kernel)
