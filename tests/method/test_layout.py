import random

import pytest
import torch

from headkv_vllm.method.layout import PageCounter, head_lengths, num_head_pages, page_positions, row_offset


def brute_positions(kept, bs, pages_per_head):
    keys = sorted((j * bs - kept[h], h, j) for h in range(len(kept)) for j in range(pages_per_head + 400))
    return {(h, j): p for p, (_, h, j) in enumerate(keys)}


def random_heads(seed, head_counts, block_sizes, max_kept):
    rng = random.Random(seed)
    heads, bs = rng.choice(head_counts), rng.choice(block_sizes)
    return heads, bs, [rng.randint(1, max_kept) for _ in range(heads)]


@pytest.mark.parametrize("seed", range(40))
def test_page_positions_are_the_canonical_order(seed):
    heads, bs, kept = random_heads(seed, [1, 3, 8], [1, 8, 16], 80)
    pages = 12
    pos = page_positions(torch.tensor([kept]), bs, pages)[0]
    rank = brute_positions(kept, bs, pages)
    assert all(pos[h, j] == rank[(h, j)] for h in range(heads) for j in range(pages))


@pytest.mark.parametrize("seed", range(20))
def test_pages_in_use_are_a_prefix_for_every_length(seed):
    heads, bs, kept = random_heads(seed, [2, 3, 8], [1, 4, 16], 60)
    prompt = 64
    pos = page_positions(torch.tensor([kept]), bs, 128)[0]
    for generated in range(0, 50, 7):
        lens = head_lengths(tuple(kept), prompt, prompt + generated)
        used = sorted(int(pos[h, j]) for h in range(heads) for j in range(-(-lens[h] // bs)))
        assert used == list(range(len(used)))
        assert len(used) == num_head_pages(tuple(kept), prompt, prompt + generated, bs)


def test_head_lengths_and_pages():
    assert head_lengths((13, 58), prompt_len=100, num_tokens=100) == [13, 58]
    assert head_lengths((13, 58), prompt_len=100, num_tokens=103) == [16, 61]
    assert num_head_pages((13, 58), 100, 103, 16) == 1 + 4


@pytest.mark.parametrize("seed", range(20))
def test_page_counter_equals_the_sum_over_heads(seed):
    rng = random.Random(seed)
    heads, bs = rng.choice([1, 3, 8]), rng.choice([1, 8, 16, 32])
    tables = {}

    def kept_of(n):  # any kept <= n, fixed per prompt length
        return tables.setdefault(n, tuple(rng.randint(1, n) for _ in range(heads)))

    counter = PageCounter(kept_of, bs)
    for _ in range(300):
        n = rng.randint(1, 3000)
        t = rng.randint(1, n + 600)
        assert counter.pages(n, t) == num_head_pages(kept_of(n), n, t, bs), (n, t)


def test_row_entries_of_a_chunked_prompt():
    # kept (20, 3, 44) of a 50-token prompt, 16-token pages: compressed 2 + 1 + 3 = 6 pages,
    # uncompressed 3 heads x 4 pages = 12
    counter = PageCounter(lambda n: (20, 3, 44), 16)
    assert counter.row_entries(50, 30, chunked=True) == 3 * 2  # mid-prompt: every head, uncompressed
    assert row_offset((20, 3, 44), 50, 16) == 12 - 6
    assert counter.row_entries(50, 50, chunked=True) == 6 + 6  # leading entries + compressed pages
    assert counter.row_entries(50, 50, chunked=False) == 6
    # 13 generated: heads hold 33, 16, 57 tokens -> 3 + 1 + 4 pages, after the same 6 entries
    assert counter.row_entries(50, 63, chunked=True) == 6 + 8
