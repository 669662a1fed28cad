"""The per-step attention rules of the two probes (docs/method.md section 1).

At each decoding step the model has just produced ``token`` from one query per
head; ``attn`` holds that query's attention over the sequence, ``[layers, heads,
positions]``. Each rule returns the credit every head earns for this step,
``[layers, heads]``; a head's trial score is the sum over the steps.
"""

from __future__ import annotations

import torch


def retrieval_credit(attn: torch.Tensor, span: tuple[int, int], ids: torch.Tensor, token: int) -> torch.Tensor:
    """R: 1/N when the head's top-1 position lies in the needle span (N tokens long)
    and holds the token just generated (the head copies from the needle)."""
    start, end = span
    top = attn.argmax(dim=-1)  # [L, H]
    inside = (top >= start) & (top < end)
    copied = ids[top.clamp(max=ids.numel() - 1)] == token
    return (inside & copied).to(torch.float32) / (end - start)


def reasoning_credit(attn: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """R2: over the head's top-N positions (N = target sentence length), the
    attention weight of those inside the target sentence, divided by N."""
    start, end = span
    n = end - start
    weight, pos = attn.topk(n, dim=-1)  # [L, H, N]
    inside = (pos >= start) & (pos < end)
    return (weight.to(torch.float32) * inside).sum(dim=-1) / n
