"""Head lengths and the canonical page order (docs/kv_layout.md), shared by the
scheduler-side manager (pure Python) and the worker-side builder (torch)."""

from __future__ import annotations

import torch


def head_lengths(kept: tuple[int, ...], prompt_len: int, num_tokens: int) -> list[int]:
    """Tokens each KV head of a layer holds once ``num_tokens`` tokens are computed.

    ``kept[h]`` is what head h keeps of the prompt (from ``Budgets.kept``); every
    token past the prompt is appended to every head.
    """
    generated = max(0, num_tokens - prompt_len)
    prompt_part = min(prompt_len, num_tokens)
    return [min(prompt_part, k) + generated for k in kept]


def num_head_pages(kept: tuple[int, ...], prompt_len: int, num_tokens: int, block_size: int) -> int:
    return sum(-(-n // block_size) for n in head_lengths(kept, prompt_len, num_tokens))


def page_positions(kept: torch.Tensor, block_size: int, max_pages: int) -> torch.Tensor:
    """Block-table position of each head page.

    kept: [R, H] int64, tokens each head keeps of the prompt.
    Returns pos: [R, H, max_pages] int64; ``pos[r, h, j]`` is where head h's j-th
    page sits in request r's block-table row.

    Canonical order: pages (h, j) sorted by ``(j * block_size - kept[h], h)``.
    Head h needs page j once ``generated > j * block_size - kept[h]``, so for any
    number of generated tokens the pages in use are a prefix of this order, and
    the position of a page never depends on allocation history. The position is
    the number of pages that sort before it:
        pos(h, j) = sum_h' max(0, ceil((j*bs - kept[h] + kept[h'] + [h' < h]) / bs))
    """
    num_heads = kept.shape[1]
    j = torch.arange(max_pages, device=kept.device)
    key = j[None, None, :] * block_size - kept[:, :, None]  # [R, H, J]
    before = (torch.arange(num_heads, device=kept.device)[None, :] < torch.arange(num_heads, device=kept.device)[:, None])
    t = key[:, :, :, None] + kept[:, None, None, :] + before[None, :, None, :].long()  # [R, H, J, H']
    counts = torch.div(t + block_size - 1, block_size, rounding_mode="floor").clamp_(min=0)
    return counts.sum(-1)
