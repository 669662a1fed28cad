"""The two page stores behind one interface, driven by the compute core over several
steps (prefills, a recomputed request, decodes), and the block-table route's
promise: no host work per layer.

- ``BlockTablePageStore`` (the CUDA route; on CPU tensors the kernels' PyTorch
  references) and ``CpuPageStore`` (vLLM's CPU ops) give the same attention output
  at every step, and both equal plain attention over each head's kept tokens.
- Per layer, the block-table route neither synchronises nor copies to the host:
  ``layer_state`` and ``forward`` run under a guard that fails on any op that would
  wait for the GPU, with the Triton launchers replaced by fakes (CUDA itself is
  required to launch them; each fake checks its arguments and returns zeros).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from headkv_vllm.core.attention import HeadAttention, LayerStep
from headkv_vllm.core.page_store import BlockTablePageStore, KernelOps
from headkv_vllm.core.plan import KeptTable, StepInputs, build_step_plan
from headkv_vllm.engine.cpu_page_store import CpuPageStore
from headkv_vllm.kernels import append_decode_kv, paged_decode_block_table, select_store, window_scores
from headkv_vllm.method.budgets import Budgets

LAYERS, HQ, HKV, D, BS = 2, 9, 3, 64, 16
BUDGETS = Budgets(caps=((20, 3, 44), (9, 30, 1)), window=4)
SCALE = D ** -0.5
NUM_BLOCKS = 600


class Scenario:
    """Requests (prompt, generated before a preemption, arrival step): prefilled at
    their arrival step, then decoded.
    Block-table rows are filled as a scheduler would: the pages in use are a prefix of
    the canonical order, each a random free page id."""

    def __init__(self, requests, seed=0):
        self.requests = requests
        self.gen = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(NUM_BLOCKS - 1, generator=self.gen).add(1).tolist()  # block 0 is null
        width = HKV * math.ceil(400 / BS)
        self.tables = [torch.zeros(len(requests), width, dtype=torch.int32) for _ in range(LAYERS)]
        self.held = [[0] * len(requests) for _ in range(LAYERS)]
        self.total = [0] * len(requests)

    def step(self, step: int) -> StepInputs:
        """Requests arrive at their step (prefill), then decode; before it, a padding row."""
        qlens = []
        for r, (prompt, generated, arrives) in enumerate(self.requests):
            q = prompt + generated if step == arrives else (1 if step > arrives else 0)
            self.total[r] += q
            if not q:
                qlens.append(0)
                continue
            qlens.append(q)
            for layer in range(LAYERS):
                kept = BUDGETS.kept(prompt)[layer]
                extra = self.total[r] - prompt
                need = sum(-(-(min(k, prompt) + extra) // BS) for k in kept)
                while self.held[layer][r] < need:
                    self.tables[layer][r, self.held[layer][r]] = self.free.pop()
                    self.held[layer][r] += 1
        qsl = torch.tensor([0] + qlens).cumsum(0).int()
        return StepInputs(query_start_loc=qsl, seq_lens=torch.tensor(self.total),
                          prompt_lens=torch.tensor([p for p, _, _ in self.requests]), num_actual_tokens=int(qsl[-1]))

    def tokens(self, n):
        def rand(h):
            return torch.randn(n, h * D, generator=self.gen)
        return rand(HQ), rand(HKV), rand(HKV)


def run(store, scenario: Scenario, steps: int, guard=None):
    """Drive every layer of every step through the core; returns outputs [step][layer]."""
    attention = HeadAttention(HQ, HKV, D, SCALE, pool_kernel=3)
    pages = torch.zeros(NUM_BLOCKS, 2, BS, D)  # one pool: every layer's view aliases it
    kept_table = KeptTable(BUDGETS)
    outputs = []
    for s in range(steps):
        inputs = scenario.step(s)
        plan = build_step_plan(inputs, kept_table, BS, "cpu")
        per_layer = []
        for layer in range(LAYERS):
            q, k, v = scenario.tokens(inputs.num_actual_tokens)
            out = torch.zeros_like(q)
            with guard() if guard else _nothing():
                state = store.layer_state(plan, layer, scenario.tables[layer])
                attention.forward(LayerStep(plan, layer, store, state), q, k, v, pages, out)
            per_layer.append(out)
        outputs.append(per_layer)
    return outputs


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# (50, 3, 0): recomputed after preemption; (80, 0, 2) arrives while the others decode,
# so decode rows are not contiguous in steps 2+
REQUESTS = [(120, 0, 0), (37, 0, 0), (80, 0, 2), (300, 0, 0), (50, 3, 0), (6, 0, 0)]


def test_block_table_and_cpu_stores_agree_at_every_step():
    steps = 6
    cpu = run(CpuPageStore(torch.float32, BS, D, HQ, HKV), Scenario(REQUESTS), steps)
    table = run(BlockTablePageStore(BS, "cpu"), Scenario(REQUESTS), steps)
    for s in range(steps):
        for layer in range(LAYERS):
            # fp32 on both sides; what differs is summation order
            torch.testing.assert_close(table[s][layer], cpu[s][layer], atol=2e-5, rtol=2e-5,
                                       msg=f"step {s} layer {layer}")


def test_cpu_store_positions_cache_is_bounded(monkeypatch):
    """Page positions are cached per (prompt length, KV size), least recently used
    dropped beyond the bound; evicting them every step changes nothing."""
    steps = 6
    full = run(CpuPageStore(torch.float32, BS, D, HQ, HKV), Scenario(REQUESTS), steps)
    monkeypatch.setattr(CpuPageStore, "MAX_CACHED_POSITIONS", 1)
    small = CpuPageStore(torch.float32, BS, D, HQ, HKV)
    tight = run(small, Scenario(REQUESTS), steps)
    (key,) = small._by_prompt
    assert small._by_prompt.total == small._by_prompt.peek(key).numel()
    for s in range(steps):
        for layer in range(LAYERS):
            torch.testing.assert_close(tight[s][layer], full[s][layer], atol=0, rtol=0)


def test_cpu_store_positions_cache_drops_the_least_recently_used(monkeypatch):
    store = CpuPageStore(torch.float32, BS, D, HQ, HKV)
    kept = torch.full((LAYERS, HKV), 40, dtype=torch.int32)
    one = store._positions_of((100, None), kept, 4).numel()
    monkeypatch.setattr(store._by_prompt, "capacity", 2 * one)
    store._positions_of((200, None), kept, 4)
    store._positions_of((100, None), kept, 4)  # used again: now the most recent
    store._positions_of((300, 64), kept, 4)  # over the bound: (200, None) goes
    assert list(store._by_prompt) == [(100, None), (300, 64)] and store._by_prompt.total == 2 * one


def test_decode_equals_attention_over_the_kept_tokens():
    """The block-table store's decode output equals plain softmax attention over each
    head's kept tokens, found independently by scoring the prompt (window scores +
    top-k, ties to the lower position) and appending the generated tokens."""
    gen = torch.Generator().manual_seed(3)
    prompt, steps = 90, 4
    scenario = Scenario([(prompt, 0, 0)], seed=5)
    store = BlockTablePageStore(BS, "cpu")
    attention = HeadAttention(HQ, HKV, D, SCALE, pool_kernel=3)
    pages = torch.zeros(NUM_BLOCKS, 2, BS, D)
    kept_table = KeptTable(BUDGETS)
    layer = 1
    keys = values = None
    for s in range(steps):
        inputs = scenario.step(s)
        n = inputs.num_actual_tokens
        q, k, v = (torch.randn(n, h * D, generator=gen) for h in (HQ, HKV, HKV))
        plan = build_step_plan(inputs, kept_table, BS, "cpu")
        out = torch.zeros_like(q)
        attention.forward(LayerStep(plan, layer, store, store.layer_state(plan, layer, scenario.tables[layer])),
                          q, k, v, pages, out)
        k3, v3 = k.view(n, HKV, D), v.view(n, HKV, D)
        if s == 0:
            w = BUDGETS.window
            scores = window_scores.window_scores_ref(q.view(n, HQ, D)[prompt - w:], k3, SCALE, 3)
            kept = BUDGETS.kept(prompt)[layer]
            keys, values = [], []
            for h in range(HKV):
                top = scores[h].sort(descending=True, stable=True).indices[: kept[h] - w].sort().values
                idx = torch.cat([top, torch.arange(prompt - w, prompt)])
                keys.append(k3[idx, h])
                values.append(v3[idx, h])
            continue
        keys = [torch.cat([keys[h], k3[:, h]]) for h in range(HKV)]
        values = [torch.cat([values[h], v3[:, h]]) for h in range(HKV)]
        qh = q.view(HQ, D)
        expect = torch.stack([
            torch.softmax(qh[i] @ keys[i // (HQ // HKV)].T * SCALE, -1) @ values[i // (HQ // HKV)] for i in range(HQ)
        ])
        torch.testing.assert_close(out.view(HQ, D), expect, atol=2e-5, rtol=2e-5, msg=f"step {s}")


# Ops that make the host wait for the device (or read device data on the host).
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive",
               "repeat_interleave", "equal", "is_nonzero"}


class NoHostSync(TorchDispatchMode):
    """Fails on any op that would synchronise with the GPU or copy to the host:
    scalar reads, data-dependent shapes, boolean-mask indexing; ``tolist``/``item``/
    ``cpu``/``numpy`` raise as well."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS:
            raise AssertionError(f"per-layer host sync: aten.{name}")
        if name in ("index", "index_put", "index_put_"):
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                raise AssertionError(f"per-layer host sync: boolean-mask aten.{name}")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "item", "cpu", "numpy")}
        for name in self._saved:
            setattr(torch.Tensor, name, _forbidden(name))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, fn)
        return super().__exit__(*exc)


def _forbidden(name):
    def call(self, *args, **kwargs):
        raise AssertionError(f"per-layer host copy: Tensor.{name}()")
    return call


class FakeCudaKernels:
    """Stand-ins for the Triton launchers, which need CUDA: each checks that its
    arguments are tensors of the expected shapes and writes or returns zeros."""

    calls: list[str] = []

    @classmethod
    def install(cls, monkeypatch):
        cls.calls = []
        monkeypatch.setattr(select_store, "select_and_store_triton", cls.select_and_store)
        monkeypatch.setattr(append_decode_kv, "append_decode_kv_triton", cls.append)
        monkeypatch.setattr(paged_decode_block_table, "paged_decode_block_table_triton", cls.decode)
        monkeypatch.setattr(window_scores, "window_scores_triton", cls.scores)

    @classmethod
    def select_and_store(cls, scores, k, v, caps, lengths, slots, pages):
        assert scores.shape[0] == k.shape[1] == caps.shape[0] == lengths.shape[0] == slots.shape[0]
        cls.calls.append("select_and_store")

    @classmethod
    def append(cls, k, v, pages, table, kept, lengths):
        assert k.shape[:2] == kept.shape == lengths.shape and table.shape[0] == k.shape[0]
        cls.calls.append("append")

    @classmethod
    def decode(cls, q, pages, table, kept, lengths, scale, max_len):
        assert table.shape[0] == q.shape[0] == kept.shape[0] and isinstance(max_len, int)
        cls.calls.append("decode")
        return torch.zeros_like(q)

    @classmethod
    def scores(cls, q_win, k, scale, pool_kernel):
        cls.calls.append("scores")
        return torch.zeros(k.shape[1], k.shape[0] - q_win.shape[0])


def test_block_table_route_does_no_host_work_per_layer(monkeypatch):
    FakeCudaKernels.install(monkeypatch)
    run(BlockTablePageStore(BS, "cpu", use_triton=True), Scenario(REQUESTS), steps=3, guard=NoHostSync)
    calls = FakeCudaKernels.calls
    # 6 prefills per layer (5 in step 0, one in step 2), one recomputed request; steps 1-2:
    # one append and one decode launch per layer
    assert calls.count("select_and_store") == 6 * LAYERS
    assert calls.count("decode") == LAYERS * (1 + 2) and calls.count("append") == 2 * LAYERS
    assert "scores" in calls  # the layer's window scores are the store's kernels too, on CPU tensors


def test_each_store_chooses_its_kernels_when_made():
    """Triton on CUDA and the references elsewhere, unless the store is told; never by
    the tensors a call gets."""
    assert BlockTablePageStore(BS, "cuda").ops == KernelOps.choose(triton=True)
    assert BlockTablePageStore(BS, torch.device("cpu")).ops == KernelOps.choose(triton=False)
    assert not BlockTablePageStore(BS, "cuda", use_triton=False).ops.triton
    assert BlockTablePageStore(BS, "cpu", use_triton=True).ops.window_scores is window_scores.window_scores_triton
    assert CpuPageStore(torch.float32, BS, D, HQ, HKV).ops.window_scores is window_scores.window_scores_ref


def test_the_guard_catches_host_syncs():
    t = torch.arange(5)
    for bad in (lambda: t.max().item(), lambda: t.tolist(), lambda: t[t > 2], lambda: int(t.sum()),
                lambda: t.nonzero(), lambda: bool(t.any())):
        with pytest.raises(AssertionError, match="per-layer host"):
            with NoHostSync():
                bad()


@pytest.mark.parametrize("store", ["cpu", "block-table"])
def test_recomputed_tokens_see_what_they_saw_when_decoded(store):
    """Independent check of the recompute path: a request decoded token by token, then
    the same request preempted and recomputed in one step (prompt + its generated
    tokens, same q/k/v): each recomputed token's output equals its decode output."""
    prompt, generated, layer = 90, 3, 0
    gen = torch.Generator().manual_seed(11)
    n = prompt + generated
    q, k, v = (torch.randn(n, h * D, generator=gen) for h in (HQ, HKV, HKV))

    def make():
        return CpuPageStore(torch.float32, BS, D, HQ, HKV) if store == "cpu" else BlockTablePageStore(BS, "cpu")

    def forward(st, scenario, pages, step, rows):
        inputs = scenario.step(step)
        plan = build_step_plan(inputs, KeptTable(BUDGETS), BS, "cpu")
        out = torch.zeros(len(rows), HQ * D)
        HeadAttention(HQ, HKV, D, SCALE, pool_kernel=3).forward(
            LayerStep(plan, layer, st, st.layer_state(plan, layer, scenario.tables[layer])),
            q[rows], k[rows], v[rows], pages, out)
        return out

    decoded_store, decoded = make(), Scenario([(prompt, 0, 0)], seed=1)
    pages = torch.zeros(NUM_BLOCKS, 2, BS, D)
    forward(decoded_store, decoded, pages, 0, list(range(prompt)))
    one_by_one = torch.cat([forward(decoded_store, decoded, pages, 1 + j, [prompt + j]) for j in range(generated)])

    recomputed_store, recomputed = make(), Scenario([(prompt, generated, 0)], seed=2)
    out = forward(recomputed_store, recomputed, torch.zeros(NUM_BLOCKS, 2, BS, D), 0, list(range(n)))
    torch.testing.assert_close(out[prompt:], one_by_one, atol=2e-5, rtol=2e-5)
