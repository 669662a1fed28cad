"""Inputs shared by the kernel tests: the device, page tables that follow
docs/kv_layout.md, and a page pool too large for int32 offsets.

Without a CUDA device the kernels run in Triton's interpreter: conftest.py sets
TRITON_INTERPRET=1 before any kernel module is imported (the launchers say so
if it was not).
"""

from __future__ import annotations

import torch

from headkv_vllm.method.layout import page_positions

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Pages of 16 positions x head_dim 16 are 512 elements: blocks from HUGE_FIRST_BLOCK
# on start past element 2**31 of the pool. torch.empty leaves the pool untouched
# (not resident on the CPU); only the blocks a test uses are written.
HUGE_FIRST_BLOCK = 2**22
HUGE_NUM_BLOCKS = HUGE_FIRST_BLOCK + 64


def huge_pages(dtype, block_size=16, head_dim=16) -> torch.Tensor:
    """A page pool whose blocks from HUGE_FIRST_BLOCK on lie past element 2**31.

    The pool is a view starting 2**31 elements into a larger allocation, so that a
    kernel computing offsets in int32 (wrapping to -2**31 + x) reads and writes
    mapped memory and fails the comparison instead of crashing the process."""
    per_block = 2 * block_size * head_dim
    storage = torch.empty(2**31 + HUGE_NUM_BLOCKS * per_block, dtype=dtype, device=DEVICE)
    pages = storage[2**31 :].view(HUGE_NUM_BLOCKS, 2, block_size, head_dim)
    assert HUGE_FIRST_BLOCK * pages.stride(0) >= 2**31  # offsets of the blocks in use overflow int32
    return pages


def random_slots(lengths: torch.Tensor, block_size: int, num_blocks: int, first_block: int = 1,
                 gen: torch.Generator | None = None) -> torch.Tensor:
    """slots [..., Lmax] int64: each head's positions on its own randomly chosen,
    scattered pages in [first_block, first_block + num_blocks); positions past a
    head's length point at random in-range slots (the kernels must mask them)."""
    lmax = int(lengths.max())
    pages_per_head = -(-lmax // block_size)
    heads = lengths.numel()
    assert heads * pages_per_head <= num_blocks
    blocks = torch.randperm(num_blocks, generator=gen)[: heads * pages_per_head].view(*lengths.shape, -1) + first_block
    p = torch.arange(lmax)
    slots = blocks[..., p // block_size] * block_size + p % block_size
    junk = torch.randint(first_block * block_size, (first_block + num_blocks) * block_size, slots.shape, generator=gen)
    return torch.where(p < lengths[..., None], slots, junk)


def canonical_rows(kept: torch.Tensor, lengths: torch.Tensor, block_size: int, num_blocks: int,
                   first_block: int = 1, spare: int = 3, gen: torch.Generator | None = None) -> torch.Tensor:
    """Block-table rows [B, W] int32 holding each head's pages at its canonical
    position (``headkv_vllm.method.layout.page_positions``) on scattered blocks; the row
    tail past the pages in use is padding (block 0), as in vLLM's block table."""
    batch, heads = kept.shape
    pages = -(-lengths // block_size)  # [B, H]
    width = int(pages.sum(1).max()) + spare
    pos = page_positions(kept, block_size, int(pages.max()))
    used = int(pages.sum())
    ids = torch.randperm(num_blocks, generator=gen)[:used] + first_block
    rows = torch.zeros(batch, width, dtype=torch.int32)
    take = 0
    for b in range(batch):
        for h in range(heads):
            for j in range(int(pages[b, h])):
                rows[b, int(pos[b, h, j])] = int(ids[take])
                take += 1
    return rows
