"""Triton decode attention vs the PyTorch references: over per-head pages by slot
table (kernels/paged_decode.py) and by block-table row (paged_decode_block_table.py),
the decode-token append (append_decode_kv.py), and the dense baseline
(dense_paged_decode.py)."""

import pytest
import torch

from headkv_vllm.kernels.append_decode_kv import append_decode_kv, append_decode_kv_ref, append_decode_kv_triton
from headkv_vllm.kernels.dense_paged_decode import dense_paged_decode_ref, dense_paged_decode_triton
from headkv_vllm.kernels import split_k_decode
from headkv_vllm.kernels.head_page_rows import head_page_slots
from headkv_vllm.kernels.paged_decode import paged_decode, paged_decode_ref, paged_decode_triton
from headkv_vllm.kernels.paged_decode_block_table import (
    paged_decode_block_table, paged_decode_block_table_ref, paged_decode_block_table_triton,
)
from headkv_vllm.method.layout import page_positions
from support.kernel_cases import DEVICE, DTYPES, HUGE_FIRST_BLOCK, canonical_rows, huge_pages, random_slots

# Output tolerances per dtype. The kernels round softmax weights to the cache dtype
# before the P @ V product (as flash attention does) and round the output; the
# references stay in fp32 until the final cast.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),  # fp16 eps 2**-11: weight + output rounding
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),  # bf16 eps 2**-8: weight + output rounding
}

# (Hq, Hkv, head_dim, block size, lengths [B][Hkv])
CASES = [
    (9, 3, 16, 8, [[5, 17, 1], [9, 2, 24]]),  # GQA 9:3, one split
    (5, 1, 32, 1, [[1], [150], [33]]),  # 5:1, page size 1, split-K
    (4, 4, 64, 16, [[300, 1, 64, 65]]),  # 1:1, split-K with empty splits for short heads
    (32, 8, 128, 16, [[7, 130, 1, 64, 33, 90, 2, 200]]),  # Llama-3-8B heads
    (6, 2, 128, 8, [[1, 1], [77, 3], [5, 190]]),  # mixed lengths in one batch
]


def _q_pages(batch, hq, d, num_blocks, block_size, dtype, g):
    q = torch.randn(batch, hq, d, generator=g).to(dtype).to(DEVICE)
    pages = torch.randn(num_blocks, 2, block_size, d, generator=g).to(dtype).to(DEVICE)
    return q, pages


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv,d,block_size,lengths", CASES)
def test_slot_table_decode_matches_reference(hq, hkv, d, block_size, lengths, dtype):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor(lengths)
    num_blocks = lengths.numel() * -(-int(lengths.max()) // block_size) + 9
    q, pages = _q_pages(lengths.shape[0], hq, d, num_blocks, block_size, dtype, g)
    slots = random_slots(lengths, block_size, num_blocks - 1, gen=g).to(DEVICE)
    lengths = lengths.to(DEVICE)
    got = paged_decode_triton(q, pages, slots, lengths, d**-0.5)
    torch.testing.assert_close(got, paged_decode_ref(q, pages, slots, lengths, d**-0.5), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv,d,block_size,lengths", CASES)
def test_block_table_decode_matches_reference(hq, hkv, d, block_size, lengths, dtype):
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor(lengths)
    generated = torch.randint(0, 3, (lengths.shape[0], 1), generator=g)
    kept = (lengths - generated).clamp(min=0)  # heads hold kept + generated tokens
    lengths = kept + generated
    lengths[lengths == 0] = kept[lengths == 0] = 1
    num_blocks = int((-(-lengths // block_size)).sum()) + 11
    rows = canonical_rows(kept, lengths, block_size, num_blocks - 1, gen=g).to(DEVICE)
    q, pages = _q_pages(lengths.shape[0], hq, d, num_blocks, block_size, dtype, g)
    kept, lengths = kept.to(DEVICE), lengths.to(DEVICE)
    expect = paged_decode_block_table_ref(q, pages, rows, kept, lengths, d**-0.5)
    got = paged_decode_block_table_triton(q, pages, rows, kept, lengths, d**-0.5)
    torch.testing.assert_close(got, expect, **TOL[dtype])
    # With the host's max length the grid is sized to the heads, not to the row.
    got = paged_decode_block_table_triton(q, pages, rows, kept, lengths, d**-0.5, max_len=int(lengths.max()))
    torch.testing.assert_close(got, expect, **TOL[dtype])


@pytest.mark.parametrize("block_size", [1, 8, 16])
@pytest.mark.parametrize("seed", range(3))
def test_block_table_slots_follow_the_layout(block_size, seed):
    # head_page_slots (kernels) against headkv_vllm.method.layout.page_positions (engine).
    g = torch.Generator().manual_seed(seed)
    kept = torch.randint(1, 60, (3, 5), generator=g)
    lengths = kept + torch.randint(0, 40, (3, 1), generator=g)
    rows = canonical_rows(kept, lengths, block_size, int(lengths.sum()) + 10, gen=g)
    lmax = int(lengths.max())
    p = torch.arange(lmax)
    slots = head_page_slots(rows, kept, p, block_size)
    pos = page_positions(kept, block_size, -(-lmax // block_size))[:, :, p // block_size]
    expect = rows.long().gather(1, pos.clamp(max=rows.shape[1] - 1).flatten(1)).view(pos.shape) * block_size + p % block_size
    used = p < lengths[:, :, None]
    assert torch.equal(slots[used], expect[used])
    assert slots[used].unique().numel() == int(used.sum())  # no two head positions share a slot


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [1, 8, 16])
def test_append_matches_reference(dtype, block_size):
    g = torch.Generator().manual_seed(2)
    kept = torch.tensor([[5, 16, 1], [40, 9, 17]])
    lengths = kept + torch.tensor([[1], [17]])  # the new token is the last position
    num_blocks = int((-(-lengths // block_size)).sum()) + 5
    rows = canonical_rows(kept, lengths, block_size, num_blocks - 1, gen=g).to(DEVICE)
    pages = torch.randn(num_blocks, 2, block_size, 16, generator=g).to(dtype).to(DEVICE)
    k, v = (torch.randn(2, 3, 16, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    expect, got = pages.clone(), pages.clone()
    append_decode_kv_ref(k, v, expect, rows, kept.to(DEVICE), lengths.to(DEVICE))
    append_decode_kv_triton(k, v, got, rows, kept.to(DEVICE), lengths.to(DEVICE))
    assert not torch.equal(expect, pages)
    torch.testing.assert_close(got, expect, atol=0, rtol=0)  # a copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hq,hkv,d,block_size,seq_lens", [(9, 3, 16, 16, [1, 200, 77]), (8, 8, 64, 1, [40, 3])])
def test_dense_baseline_matches_reference(hq, hkv, d, block_size, seq_lens, dtype):
    g = torch.Generator().manual_seed(3)
    seq_lens = torch.tensor(seq_lens)
    width = -(-int(seq_lens.max()) // block_size)
    num_blocks = len(seq_lens) * width + 3
    table = (torch.randperm(num_blocks, generator=g)[: len(seq_lens) * width].view(-1, width)).int().to(DEVICE)
    kv = torch.randn(2, num_blocks, block_size, hkv, d, generator=g).to(dtype).to(DEVICE)
    q = torch.randn(len(seq_lens), hq, d, generator=g).to(dtype).to(DEVICE)
    seq_lens = seq_lens.to(DEVICE)
    got = dense_paged_decode_triton(q, kv, table, seq_lens, d**-0.5)
    torch.testing.assert_close(got, dense_paged_decode_ref(q, kv, table, seq_lens, d**-0.5), **TOL[dtype])


def test_merge_reads_only_the_splits_that_ran(monkeypatch):
    # Short heads leave splits empty; they write nothing, so a NaN workspace must not leak.
    monkeypatch.setattr(split_k_decode, "partials_buffer", lambda shape, device: torch.full(shape, float("nan"), device=device))
    g = torch.Generator().manual_seed(8)
    lengths = torch.tensor([[1, 260, 64, 65]])
    assert split_k_decode.num_splits(1, 4, 260, DEVICE, split_k_decode.HEAD_PAGE_TILES_PER_SPLIT) > 2
    q, pages = _q_pages(1, 8, 32, 80, 16, torch.float32, g)
    slots = random_slots(lengths, 16, 79, gen=g).to(DEVICE)
    got = paged_decode_triton(q, pages, slots, lengths.to(DEVICE), 0.2)
    torch.testing.assert_close(got, paged_decode_ref(q, pages, slots, lengths.to(DEVICE), 0.2), **TOL[torch.float32])


def test_slot_table_shared_across_rows_like_recomputed_tokens():
    # The backend decodes a preempted request's generated tokens with one slot table
    # expanded over the rows (stride 0) and growing lengths.
    g = torch.Generator().manual_seed(5)
    q, pages = _q_pages(4, 6, 32, 40, 8, torch.float16, g)
    slots = random_slots(torch.tensor([70, 12]), 8, 39, gen=g).to(DEVICE)[None].expand(4, -1, -1)
    lengths = (torch.tensor([[67, 9]]) + torch.arange(4)[:, None]).to(DEVICE)
    got = paged_decode_triton(q, pages, slots, lengths, 0.2)
    torch.testing.assert_close(got, paged_decode_ref(q, pages, slots, lengths, 0.2), **TOL[torch.float16])


def test_int64_offsets_in_a_pool_past_2_pow_31_elements():
    g = torch.Generator().manual_seed(6)
    pages = huge_pages(torch.float16)
    top = pages[HUGE_FIRST_BLOCK:]
    top.copy_(torch.randn(top.shape, generator=g).half())  # only these 64 blocks are touched
    kept = torch.tensor([[20, 70, 3]])
    lengths = kept + 2
    q = torch.randn(1, 6, 16, generator=g).half().to(DEVICE)
    scale = 0.25
    rows = canonical_rows(kept, lengths, 16, 64, first_block=HUGE_FIRST_BLOCK, gen=g).to(DEVICE)
    kept, lengths = kept.to(DEVICE), lengths.to(DEVICE)
    expect = paged_decode_block_table_ref(q, pages, rows, kept, lengths, scale)
    torch.testing.assert_close(paged_decode_block_table_triton(q, pages, rows, kept, lengths, scale), expect,
                               **TOL[torch.float16])
    slots = head_page_slots(rows, kept, torch.arange(int(lengths.max()), device=DEVICE), 16)
    torch.testing.assert_close(paged_decode_triton(q, pages, slots, lengths, scale), expect, **TOL[torch.float16])
    k, v = (torch.randn(1, 3, 16, generator=g).half().to(DEVICE) for _ in range(2))
    append_decode_kv_triton(k, v, pages, rows, kept, lengths)
    last = slots.gather(2, (lengths - 1)[:, :, None])[0, :, 0]
    torch.testing.assert_close(pages[last // 16, 0, last % 16], k[0], atol=0, rtol=0)  # a copy
    torch.testing.assert_close(pages[last // 16, 1, last % 16], v[0], atol=0, rtol=0)


def test_dispatch_matches_references():
    g = torch.Generator().manual_seed(7)
    kept, lengths = torch.tensor([[4, 30]]), torch.tensor([[5, 31]])
    rows = canonical_rows(kept, lengths, 4, 30, gen=g).to(DEVICE)
    q, pages = _q_pages(1, 4, 16, 31, 4, torch.float32, g)
    kept, lengths = kept.to(DEVICE), lengths.to(DEVICE)
    expect = paged_decode_block_table_ref(q, pages, rows, kept, lengths, 0.25)
    torch.testing.assert_close(paged_decode_block_table(q, pages, rows, kept, lengths, 0.25), expect,
                               **TOL[torch.float32])
    slots = head_page_slots(rows, kept, torch.arange(31, device=DEVICE), 4)
    torch.testing.assert_close(paged_decode(q, pages, slots, lengths, 0.25), expect, **TOL[torch.float32])
    k = torch.ones(1, 2, 16, device=DEVICE)
    append_decode_kv(k, k, pages, rows, kept, lengths)
    assert bool((pages[slots[0, 1, 30] // 4, :, slots[0, 1, 30] % 4] == 1).all())
