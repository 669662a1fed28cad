"""Select each head's kept prompt tokens and store them in its head pages.

Page layout (docs/kv_layout.md): ``pages[block, 0]`` holds K and ``pages[block, 1]``
holds V of ``block_size`` consecutive positions of ONE KV head; head position p
of a head lives at ``slots[h, p] = block * block_size + p % block_size``.
"""

from __future__ import annotations

import torch


def select_and_store_ref(
    scores: torch.Tensor,  # [Hkv, P] float32 window scores of the P = n - w prefix positions
    k: torch.Tensor,  # [T, Hkv, d] keys of the step's tokens for this request (prompt, then generated)
    v: torch.Tensor,  # [T, Hkv, d]
    caps: torch.Tensor,  # [Hkv] int64, prefix tokens each head keeps (0 <= cap <= P)
    lengths: torch.Tensor,  # [Hkv] int64, head length after the step: cap + (T - P)
    slots: torch.Tensor,  # [Hkv, Lmax] int64, slot of each head position (Lmax >= max(lengths))
    pages: torch.Tensor,  # [num_blocks, 2, block_size, d] one layer's head pages
) -> None:
    """Head h stores, in order: its top-``caps[h]`` prefix positions by score
    (ties: lower position first; stored in ascending position), then every token from position P on (the window and
    any generated tokens)."""
    num_heads, prefix = scores.shape
    lmax = slots.shape[1]
    kmax = min(prefix, lmax)
    # Max-pooling makes plateaus of equal scores; a stable sort breaks ties by the lower position.
    top = scores.sort(dim=-1, descending=True, stable=True).indices[:, :kmax]
    # keep the top caps[h] of each row, ordered by position
    rank_ok = torch.arange(kmax, device=scores.device)[None, :] < caps[:, None]
    chosen = torch.where(rank_ok, top, prefix + lmax).sort(dim=-1).values  # [Hkv, kmax]
    p = torch.arange(lmax, device=scores.device)[None, :]
    from_top = p < caps[:, None]
    src = torch.where(from_top, chosen.gather(1, p.clamp(max=max(kmax - 1, 0)).expand(num_heads, -1)) if kmax else p, prefix + p - caps[:, None])
    valid = p < lengths[:, None]
    head = torch.arange(num_heads, device=scores.device)[:, None].expand(-1, lmax)
    src, head, slot = src[valid], head[valid], slots[valid]
    block_size = pages.shape[2]
    blk, off = slot // block_size, slot % block_size
    pages[blk, 0, off] = k[src, head].to(pages.dtype)
    pages[blk, 1, off] = v[src, head].to(pages.dtype)
