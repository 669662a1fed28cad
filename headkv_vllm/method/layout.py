"""Head lengths and the canonical page order (docs/kv_layout.md), shared by the
scheduler-side manager (pure Python) and the worker-side builder (torch)."""

from __future__ import annotations

import torch

from headkv_vllm.method.bounded import BoundedCache


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


def uncompressed_pages(num_kv_heads: int, num_tokens: int, block_size: int) -> int:
    """Pages of a prompt being prefilled in chunks: every head holds all ``num_tokens``
    tokens, head h's page j at row position ``j * num_kv_heads + h``."""
    return num_kv_heads * -(-num_tokens // block_size)


def row_offset(kept: tuple[int, ...], prompt_len: int, block_size: int) -> int:
    """Leading null entries of a chunked prompt's row once it is compressed: its
    uncompressed prompt pages minus its compressed ones (docs/kv_layout.md)."""
    return uncompressed_pages(len(kept), prompt_len, block_size) - num_head_pages(kept, prompt_len, prompt_len, block_size)


MAX_PROMPT_LENGTHS = 4096  # a PageCounter's cached tables (bs + 1 ints each) before its cache restarts


class PageCounter:
    """``num_head_pages`` of one layer in O(1) per call, for the scheduler, which asks
    twice per layer per request per step.

    Past the prompt every head grows by one token a step, so with ``g`` generated
    tokens, ``g = m * bs + s`` and ``kept[h] = q[h] * bs + r[h]``:
    ``ceil((kept[h] + g) / bs) = q[h] + m + ceil((r[h] + s) / bs)``. Per prompt length
    the counter keeps ``sum_h q[h]`` and the last term's sum for each ``s`` in
    ``[0, bs)``."""

    def __init__(self, kept_of, block_size: int, max_tables: int = MAX_PROMPT_LENGTHS):
        self.kept_of = kept_of  # prompt length -> tuple of the layer's kept tokens per head
        self.block_size = block_size
        # prompt length -> its table; remade, not reordered, past the bound (looked up on every count)
        self._tables: BoundedCache[int, tuple[int, int, list[int], int]] = BoundedCache(max_tables, restart=True)

    def row_entries(self, prompt_len: int, num_tokens: int, chunked: bool) -> int:
        """Block-table entries of a request, null entries included (docs/kv_layout.md,
        "Scheduler count"): uncompressed while a chunked prompt is prefilled, then the
        leading nulls of a chunked prompt plus its head pages."""
        if num_tokens < prompt_len and chunked:
            return uncompressed_pages(self._table_of(prompt_len)[1], num_tokens, self.block_size)
        pages = self.pages(prompt_len, num_tokens)
        if chunked:
            pages += self.offset(prompt_len)
        return pages

    def offset(self, prompt_len: int) -> int:
        """``row_offset`` of a chunked prompt of this length."""
        return self._table_of(prompt_len)[3]

    def pages(self, prompt_len: int, num_tokens: int) -> int:
        if num_tokens < prompt_len:
            return num_head_pages(self.kept_of(prompt_len), prompt_len, num_tokens, self.block_size)
        whole, num_heads, last, _ = self._table_of(prompt_len)
        m, s = divmod(num_tokens - prompt_len, self.block_size)
        return whole + num_heads * m + last[s]

    def _table_of(self, prompt_len: int) -> tuple[int, int, list[int], int]:
        table = self._tables.get(prompt_len)
        if table is not None:
            return table
        bs = self.block_size
        raw = self.kept_of(prompt_len)
        kept = [min(k, prompt_len) for k in raw]
        whole = sum(k // bs for k in kept)
        last = [sum(-(-(k % bs + s) // bs) for k in kept) for s in range(bs)]
        return self._tables.put(prompt_len, (whole, len(kept), last, row_offset(raw, prompt_len, bs)))


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
