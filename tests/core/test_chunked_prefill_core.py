"""Chunked prefill in the compute core, without vLLM (docs/kv_layout.md, "Chunked prefill").

The same requests, with the same q/k/v at every position, run once with every prompt
in one step and once in chunks (chunks ending inside the observation window, a last
chunk that also recomputes generated tokens, generated tokens recomputed in a later
step); rows are filled as ``HeadKVManager`` fills them (uncompressed pages while
chunked, then the leading entries nulled and their pages reused by other requests).
Every position's attention output of every layer must agree, and the window queries
saved between chunks must be gone at the end. Here: the block-table store (the CUDA
route), on CUDA when there is one (the GPU check runs this file: Triton kernels), else
on the CPU (the kernels' PyTorch references); tests/core/test_cpu_head_attention.py runs the
same harness on the CPU store.
"""

from __future__ import annotations

import pytest
import torch

from headkv_vllm.core.attention import HeadAttention, LayerStep
from headkv_vllm.core.page_store import BlockTablePageStore
from headkv_vllm.core.plan import KeptTable, StepInputs, WindowStash, build_step_plan
from headkv_vllm.method.budgets import Budgets
from headkv_vllm.method.layout import PageCounter, row_offset

LAYERS, HQ, HKV, D, BS = 2, 9, 3, 64, 16
BUDGETS = Budgets(caps=((20, 3, 44), (9, 30, 1)), window=4)
SCALE = D ** -0.5
NUM_BLOCKS = 900
DECODES = 3
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (prompt, generated tokens recomputed with it, tokens per step until all are computed)
CHUNKED = [
    (120, 0, [50, 50, 20]),
    (300, 3, [100, 100, 100, 3]),  # last chunk ends at the prompt; generated tokens a step later
    (80, 0, [78, 2]),  # the last chunk holds only half the window: two window queries saved
    (81, 0, [76, 1, 1, 1, 1, 1]),  # window queries saved over several one-token chunks
    (50, 3, [30, 23]),  # the last chunk recomputes the generated tokens too
    (6, 0, [6]),  # a whole prompt next to the chunks
]
ONE_STEP = [(n, g, [n + g]) for n, g, _ in CHUNKED]


class Manager:
    """Rows as ``HeadKVManager`` fills them: ``PageCounter.row_entries`` entries, pages from a
    free list; a chunked prompt's leading ``row_offset`` entries nulled (page 0) and their
    pages freed once its computed tokens reach the prompt."""

    def __init__(self, requests, seed):
        self.requests = requests
        gen = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(NUM_BLOCKS - 1, generator=gen).add(1).tolist()
        width = HKV * (-(-400 // BS) + 1)
        self.tables = [torch.zeros(len(requests), width, dtype=torch.int32) for _ in range(LAYERS)]
        self.held = [[0] * len(requests) for _ in range(LAYERS)]
        self.chunked = [False] * len(requests)
        self.counters = [PageCounter(lambda n, layer=layer: BUDGETS.kept(n)[layer], BS) for layer in range(LAYERS)]

    def allocate(self, r: int, computed: int, total: int) -> None:
        prompt = self.requests[r][0]
        if self.chunked[r] and computed >= prompt:
            for layer in range(LAYERS):
                row = self.tables[layer][r]
                for i in range(row_offset(BUDGETS.kept(prompt)[layer], prompt, BS)):
                    if row[i] != 0:
                        self.free.insert(0, int(row[i]))  # reused first: stale data must never be read
                        row[i] = 0
        self.chunked[r] |= total < prompt
        for layer in range(LAYERS):
            need = self.counters[layer].row_entries(prompt, total, self.chunked[r])
            while self.held[layer][r] < need:
                self.tables[layer][r, self.held[layer][r]] = self.free.pop(0)
                self.held[layer][r] += 1


def tokens(requests, seed):
    """q/k/v of every (request, layer, position), the same however the prompt is split."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n, g, _ in requests:
        length = n + g + 20  # more than any request decodes
        out.append([tuple(torch.randn(length, h * D, generator=gen) for h in (HQ, HKV, HKV)) for _ in range(LAYERS)])
    return out


def run(store, requests, seed=0, device=DEVICE):
    """Outputs by (request, layer, position), and the stash left at the end."""
    manager, data = Manager(requests, seed), tokens(requests, seed=1)
    attention = HeadAttention(HQ, HKV, D, SCALE, pool_kernel=3)
    pages = torch.randn(NUM_BLOCKS, 2, BS, D).to(device)  # stale data everywhere
    kept_table, stash = KeptTable(BUDGETS), WindowStash()
    total = [0] * len(requests)
    outputs = {}
    steps = max(len(s) for _, _, s in requests) + DECODES
    for step in range(steps):
        qlens = []
        for r, (n, g, schedule) in enumerate(requests):
            q = schedule[step] if step < len(schedule) else 1
            manager.allocate(r, total[r], total[r] + q)
            qlens.append(q)
        computed = list(total)
        total = [t + q for t, q in zip(total, qlens)]
        qsl = torch.tensor([0] + qlens).cumsum(0).int()
        counts = torch.tensor(manager.held)
        inputs = StepInputs(query_start_loc=qsl, seq_lens=torch.tensor(total),
                            prompt_lens=torch.tensor([n for n, _, _ in requests]), num_actual_tokens=int(qsl[-1]),
                            row_counts=counts, request_keys=tuple(f"req-{r}" for r in range(len(requests))))
        plan = build_step_plan(inputs, kept_table, BS, device, window_stash=stash)
        for layer in range(LAYERS):
            rows = [torch.arange(c, t) for c, t in zip(computed, total)]
            q, k, v = (torch.cat([data[r][layer][i][rows[r]] for r in range(len(requests))]).to(device)
                       for i in range(3))
            out = torch.zeros_like(q)
            state = store.layer_state(plan, layer, manager.tables[layer].to(device))
            attention.forward(LayerStep(plan, layer, store, state), q, k, v, pages, out)
            at = 0
            for r, positions in enumerate(rows):
                for p in positions.tolist():
                    outputs[(r, layer, p)] = out[at].cpu()
                    at += 1
    return outputs, stash


def assert_chunked_equals_one_step(make_store, device=DEVICE) -> None:
    whole, _ = run(make_store(), ONE_STEP, device=device)
    chunked, stash = run(make_store(), CHUNKED, device=device)
    assert whole.keys() <= chunked.keys()  # the chunked run takes more steps, so decodes longer
    for key in whole:
        # fp32 (TF32 off); prompt attention sums in another order when split into chunks
        torch.testing.assert_close(chunked[key], whole[key], atol=1e-4, rtol=1e-4, msg=f"(request, layer, position) {key}")
    assert len(stash) == 0


def test_chunked_prefill_equals_one_step_prefill():
    assert_chunked_equals_one_step(lambda: BlockTablePageStore(BS, "cpu"))


def test_the_stash_refuses_a_missing_window():
    stash = WindowStash()
    stash.save("a", 0, torch.zeros(2, HQ, D), first=True)
    with pytest.raises(RuntimeError, match="request a layer 0: 2 saved window queries, expected 3"):
        stash.take("a", 0, 3)
