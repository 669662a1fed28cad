"""A prompt prefilled in chunks, before its last chunk (docs/kv_layout.md, "Chunked
prefill"): every head holds every token, uncompressed, head h's page j at row
position ``j * num_kv_heads + h``, K and V as plain ``[block_size, d]`` rows on every
route. Only these functions read or write such pages; the last chunk reads them
back, scores, and writes the kept tokens compressed through the page store.
"""

from __future__ import annotations

import torch


def uncompressed_slots(row: torch.Tensor, positions: torch.Tensor, num_kv_heads: int, block_size: int) -> torch.Tensor:
    """``row`` [W] int32 block-table row, ``positions`` [P] int64 -> [P, Hkv] int64 slots."""
    heads = torch.arange(num_kv_heads, device=row.device)
    pages = row[(positions // block_size)[:, None] * num_kv_heads + heads[None, :]].long()
    return pages * block_size + (positions % block_size)[:, None]


def write_uncompressed(pages: torch.Tensor, row: torch.Tensor, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Positions ``start ..`` of every head: ``k``/``v`` [P, Hkv, d]; ``pages`` [num_blocks, 2, bs, d]."""
    block_size = pages.shape[2]
    positions = torch.arange(start, start + k.shape[0], device=row.device)
    slots = uncompressed_slots(row, positions, k.shape[1], block_size)
    pages[slots // block_size, 0, slots % block_size] = k.to(pages.dtype)
    pages[slots // block_size, 1, slots % block_size] = v.to(pages.dtype)


def read_uncompressed(pages: torch.Tensor, row: torch.Tensor, count: int,
                      num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``0 .. count-1`` of every head -> ``k``, ``v`` [count, Hkv, d] (copies)."""
    block_size = pages.shape[2]
    slots = uncompressed_slots(row, torch.arange(count, device=row.device), num_kv_heads, block_size)
    page, offset = slots // block_size, slots % block_size
    return pages[page, 0, offset], pages[page, 1, offset]
