"""Triton selection + store vs the PyTorch reference (kernels/select_store.py)."""

import pytest
import torch
import torch.nn.functional as F

from headkv_vllm.kernels.select_store import select_and_store, select_and_store_ref, select_and_store_triton
from support.kernel_cases import DEVICE, DTYPES, HUGE_FIRST_BLOCK, huge_pages, random_slots


def _case(prefix, window, generated, caps, block_size, d=16, dtype=torch.float16, scores="rand", seed=0):
    g = torch.Generator().manual_seed(seed)
    heads = len(caps)
    t = prefix + window + generated
    caps = torch.tensor(caps)
    lengths = caps.clamp(0, prefix) + (t - prefix)
    if scores == "rand":
        s = torch.rand(heads, prefix, generator=g)
    elif scores == "pooled" and prefix:  # plateaus of equal values, as max-pooling makes
        s = F.max_pool1d(torch.rand(heads, 1, prefix, generator=g), 7, 1, 3)[:, 0]
    elif scores == "coarse":  # many exact ties, negative values, both zeros
        s = torch.randint(-3, 4, (heads, prefix), generator=g).float() / 2
        s[s == 0] = torch.where(torch.rand(int((s == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
    else:  # all equal: ties everywhere, lower positions win
        s = torch.full((heads, prefix), 0.25)
    k = torch.randn(t, heads, d, generator=g).to(dtype)
    v = torch.randn(t, heads, d, generator=g).to(dtype)
    num_blocks = heads * (-(-int(lengths.max() + 5) // block_size)) + 7
    slots = random_slots(lengths + 5, block_size, num_blocks - 1, gen=g)  # 5 padding positions per head
    pages = torch.randn(num_blocks, 2, block_size, d, generator=g).to(dtype)
    return [x.to(DEVICE) for x in (s, k, v, caps, lengths, slots, pages)]


def _run_both(s, k, v, caps, lengths, slots, pages):
    expect, got = pages.clone(), pages.clone()
    select_and_store_ref(s, k, v, caps, lengths, slots, expect)
    select_and_store_triton(s, k, v, caps, lengths, slots, got)
    return got, expect


# (prefix P, window, generated, caps per head, block size)
CASES = [
    (30, 4, 0, [0, 5, 30], 4),  # cap 0, some, all
    (30, 4, 0, [31, 200, 1], 8),  # caps above P keep the whole prefix
    (97, 8, 3, [13, 1, 96], 16),  # odd lengths, recomputed generated tokens
    (2500, 8, 0, [1200, 7, 0, 2499], 16),  # several scan tiles
    (0, 5, 0, [0, 3], 1),  # prompt shorter than the window: window only
    (9, 8, 2, [4], 1),  # page size 1
]


@pytest.mark.parametrize("scores", ["rand", "pooled", "coarse", "flat"])
@pytest.mark.parametrize("prefix,window,generated,caps,block_size", CASES)
def test_matches_reference_exactly(prefix, window, generated, caps, block_size, scores):
    got, expect = _run_both(*_case(prefix, window, generated, caps, block_size, scores=scores))
    # A copy: bit-exact, and no page outside the heads' slots changes.
    torch.testing.assert_close(got, expect, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
def test_dtypes_and_head_dims(dtype, d):
    got, expect = _run_both(*_case(70, 8, 1, [9, 0, 70, 33], 8, d=d, dtype=dtype, scores="pooled"))
    torch.testing.assert_close(got, expect, atol=0, rtol=0)  # a copy in every dtype


def test_kept_tokens_are_the_top_scored_in_position_order():
    # Independent of the reference: build the expected head contents by hand.
    s, k, v, caps, lengths, slots, pages = _case(40, 4, 2, [6, 0, 40], 8, dtype=torch.float32, scores="coarse", seed=3)
    select_and_store_triton(s, k, v, caps, lengths, slots, pages)
    s, k, v, slots, pages = s.cpu(), k.cpu(), v.cpu(), slots.cpu(), pages.cpu()
    for h, cap in enumerate([6, 0, 40]):
        order = sorted(range(40), key=lambda p: (-float(s[h, p]), p))[:cap]
        expect = sorted(order) + list(range(40, 46))
        stored = slots[h, : len(expect)]
        assert torch.equal(pages[stored // 8, 0, stored % 8], k[expect, h])
        assert torch.equal(pages[stored // 8, 1, stored % 8], v[expect, h])


def test_int64_offsets_in_a_pool_past_2_pow_31_elements():
    g = torch.Generator().manual_seed(4)
    prefix, window, caps = 40, 8, torch.tensor([5, 40, 0])
    lengths = caps + window
    k = torch.randn(prefix + window, 3, 16, generator=g).half().to(DEVICE)
    v = torch.randn(prefix + window, 3, 16, generator=g).half().to(DEVICE)
    slots = random_slots(lengths, 16, 64, first_block=HUGE_FIRST_BLOCK, gen=g).to(DEVICE)
    scores = torch.rand(3, prefix, generator=g).to(DEVICE)
    args = (scores, k, v, caps.to(DEVICE), lengths.to(DEVICE), slots)
    pages = huge_pages(torch.float16)  # one pool: the reference's result is saved, then wiped
    used = torch.cat([slots[h, : int(lengths[h])] for h in range(3)])
    blk, off = used // 16, used % 16
    select_and_store_ref(*args, pages)
    expect = pages[blk, :, off].clone()
    pages[blk, :, off] = float("nan")
    select_and_store_triton(*args, pages)
    torch.testing.assert_close(pages[blk, :, off], expect, atol=0, rtol=0)  # a copy


def test_dispatch_matches_reference():
    args = _case(30, 4, 0, [3, 30, 0], 4)
    expect, got = args[-1].clone(), args[-1].clone()
    select_and_store_ref(*args[:-1], expect)
    select_and_store(*args[:-1], got)
    torch.testing.assert_close(got, expect, atol=0, rtol=0)  # a copy
