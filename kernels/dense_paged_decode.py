"""Dense paged decode: the baseline HeadKV's decode is measured against.

Every KV head keeps every token; a page holds ``block_size`` tokens of all KV
heads, in vLLM's usual layout ``kv_cache[2, num_blocks, block_size, Hkv, d]``,
one block-table row per sequence. Same split-K kernel as the HeadKV decode
(``split_k_decode``, DENSE addressing), so a comparison measures the bytes read,
not two different kernels.

- ``dense_paged_decode_ref``: PyTorch reference.
- ``dense_paged_decode_triton``: the Triton kernel.
"""

from __future__ import annotations

import torch

from .split_k_decode import DENSE, split_k_decode


def dense_paged_decode_ref(
    q: torch.Tensor,  # [B, Hq, d] one query token per sequence
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, d]
    block_table: torch.Tensor,  # [B, W] int32 pages of each sequence, in token order
    seq_lens: torch.Tensor,  # [B] int tokens of each sequence (>= 1)
    scale: float,
) -> torch.Tensor:
    batch, num_q_heads, d = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    lmax = int(seq_lens.max()) if batch else 0
    p = torch.arange(lmax, device=q.device)
    blocks = block_table.long()[:, (p // block_size).clamp(max=block_table.shape[1] - 1)]  # [B, L]
    keys = kv_cache[0, blocks, p % block_size].float()  # [B, L, Hkv, d]
    values = kv_cache[1, blocks, p % block_size].float()
    qg = q.float().view(batch, num_kv_heads, num_q_heads // num_kv_heads, d)
    logits = torch.einsum("bkgd,blkd->bkgl", qg, keys) * scale
    logits.masked_fill_((p[None, :] >= seq_lens[:, None])[:, None, None, :], float("-inf"))
    out = torch.einsum("bkgl,blkd->bkgd", logits.softmax(dim=-1), values)
    return out.reshape(batch, num_q_heads, d).to(q.dtype)


def dense_paged_decode_triton(q, kv_cache, block_table, seq_lens, scale: float) -> torch.Tensor:
    two, num_blocks, block_size, num_kv_heads, d = kv_cache.shape
    if two != 2 or q.shape[2] != d or block_table.shape[0] != q.shape[0] or seq_lens.shape != (q.shape[0],):
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, kv_cache {tuple(kv_cache.shape)}, "
                         f"block_table {tuple(block_table.shape)}, seq_lens {tuple(seq_lens.shape)}")
    s_kv, s_block, s_pos, s_head, s_dim = kv_cache.stride()
    return split_k_decode(q, kv_cache, (s_block, s_kv, s_pos, s_head, s_dim), block_size, num_kv_heads,
                          block_table, None, seq_lens, block_table.shape[1] * block_size, scale, DENSE, None)
