"""Window scores of SnapKV/HeadKV for one prompt, per KV head (docs/headkv-method.md s.3).

PyTorch reference; the Triton kernel of the same signature lands with the kernels work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
