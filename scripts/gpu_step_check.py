"""HeadKV steps on a device, checked against references: the vLLM-free check of the
compute core that scripts/gpu_check.sh runs on a GPU (and tests/gpu/test_gpu_step_check.py
on the CPU).

A scenario of requests runs for a few steps through the core as the engine drives
it: per step the plan (``core.plan.build_step_plan``, the attention metadata), then
per layer ``BlockTablePageStore.layer_state`` and ``HeadAttention.forward`` over one
page pool shared by all layers. Step 0 prefills most requests; step 1 mixes decodes
(non-contiguous rows), a new prefill and a recomputed request (preempted after
generating tokens, prefilled again with them); later steps only decode. Every layer
has its own per-head budgets (the HeadKV policy on random head scores), so heads keep
from a few tokens to the whole prompt.

Checked at every step and layer:

- The device route (the Triton kernels on CUDA; on the CPU the Triton kernels in
  Triton's interpreter or the PyTorch references) against the reference route: the
  same step on the CPU in fp32 with the kernels' PyTorch references
  (``BlockTablePageStore("cpu", use_triton=False)``), on the same dtype-rounded inputs.
  Outputs within the dtype's tolerance; the whole page pool bit-equal (stores copy);
  the device's window scores equal ``window_scores_ref`` within fp32 tolerance. The
  reference route replays the device's scores, so that both select the same tokens
  even where two scores tie within rounding (how often the selection would differ is
  reported, not checked).
- The reference route against an oracle that uses neither the plan, the page layout
  code of the kernels nor the kernels: per head a list of kept tokens (top scores
  by a stable sort, then the window, then every later token), plain softmax attention
  (prompt rows causal over the prompt, recomputed tokens over the kept prompt and the
  generated tokens up to themselves, decodes over the list), and the reference pages
  at each head's slots (``method.layout.page_positions``) equal to the lists.
- The step's q/k/v and output come padded as under vLLM's piecewise CUDA graphs
  (more rows than ``num_actual_tokens``: ``padded_rows``): the padding rows of q/k/v
  are NaN, those of the output hold a sentinel that must stay there bit for bit (and
  the real rows, which also start at the sentinel, are the ones compared above).
- The plan is built as the engine builds it on CUDA (``pin_memory=True``: the
  host-to-device copy staged in pinned memory, non-blocking). On CUDA the plan, and
  ``layer_state`` + ``forward``, run under ``torch.cuda.set_sync_debug_mode("error")``:
  any host synchronisation fails.

Timings (CUDA only, information): the forward of a decode-only step over all layers,
CUDA events, for each case and for larger decode batches without reference.

Prints a summary; ``--out`` writes the JSON. Exit status 0 when every case passes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import random
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Device route vs the fp32 reference route. fp16/bf16: the kernels round softmax
# weights to the cache dtype before P @ V and round the output (tests/kernels/test_kernels_decode.py);
# fp32: SDPA and the split-K kernel sum in a different order than the CPU.
OUTPUT_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
SCORE_TOL = dict(atol=1e-6, rtol=1e-4)  # fp32 softmax on both sides (tests/kernels/test_kernels_window_scores.py)
ORACLE_TOL = dict(atol=5e-5, rtol=5e-5)  # fp32 vs fp32 on the CPU
OUTPUT_SENTINEL = -1000.0  # the output's rows before the forward (exact in every dtype)


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    requests: tuple[tuple[int, int, int], ...]  # (prompt, generated before a preemption, arrival step)
    steps: int
    kv_size: int
    window: int
    pool_kernel: int
    oracle_prompt_rows: int | None = None  # prompt rows per prompt the oracle recomputes (None: all)


# Rows: step 1 has decodes in rows 0, 2, 4, 5, a new prefill (row 1) and a recomputed
# request (row 3); a prompt shorter than the window or than every head's budget keeps
# everything (no scores).
SHAPES = {
    "tiny": Shape("tiny", layers=2, num_heads=4, num_kv_heads=2, head_dim=32, block_size=8,
                  requests=((40, 0, 0), (19, 0, 1), (70, 0, 0), (30, 2, 1), (5, 0, 0), (3, 0, 0)),
                  steps=3, kv_size=16, window=4, pool_kernel=3),
    "small": Shape("small", layers=3, num_heads=9, num_kv_heads=3, head_dim=64, block_size=16,
                   requests=((120, 0, 0), (37, 0, 1), (300, 0, 0), (50, 3, 1), (6, 0, 0), (90, 0, 0)),
                   steps=4, kv_size=40, window=8, pool_kernel=7),
    # Llama-3-8B attention: 32 query heads, 8 KV heads, head_dim 128, pages of 16 tokens.
    "llama": Shape("llama", layers=4, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                   requests=((4096, 0, 0), (1024, 0, 1), (2500, 0, 0), (1800, 6, 1), (7, 0, 0), (3000, 0, 0)),
                   steps=4, kv_size=512, window=8, pool_kernel=7, oracle_prompt_rows=256),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Decode-only timings without reference (CUDA): (requests, prompt, kv_size) at Llama shapes.
TIMINGS = ((64, 2048, 128), (64, 2048, 1024))


# ----------------------------------------------------------------------------- imports


def bootstrap() -> None:
    """Make ``headkv_vllm`` importable from the source tree when the package is not
    installed: ``kernels/`` and ``configs/`` are installed as ``headkv_vllm.kernels`` and
    ``headkv_vllm.configs`` (setup.py's package_dir). scripts/gpu_check.sh assembles the
    package instead; this covers ``python scripts/gpu_step_check.py`` on its own."""
    if importlib.util.find_spec("headkv_vllm") is None:
        sys.path.insert(0, str(ROOT))
    import headkv_vllm

    for sub in ("kernels", "configs"):
        name = f"headkv_vllm.{sub}"
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        spec = importlib.util.spec_from_file_location(
            name, ROOT / sub / "__init__.py", submodule_search_locations=[str(ROOT / sub)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(headkv_vllm, sub, module)


class _Core:
    """The compute core's modules, imported on first use (TRITON_INTERPRET must be set
    before the kernels are imported)."""

    def __getattr__(self, name):
        bootstrap()
        mods = {
            "attention": "headkv_vllm.core.attention", "page_store": "headkv_vllm.core.page_store",
            "plan": "headkv_vllm.core.plan", "budgets": "headkv_vllm.method.budgets",
            "config": "headkv_vllm.method.config", "layout": "headkv_vllm.method.layout",
            "window_scores": "headkv_vllm.kernels.window_scores",
        }
        if name not in mods:
            raise AttributeError(name)
        module = importlib.import_module(mods[name])
        setattr(self, name, module)
        return module


core = _Core()


# ----------------------------------------------------------------------------- checks


def compare(got: torch.Tensor, expect: torch.Tensor, atol: float, rtol: float) -> dict:
    """Element-wise ``|got - expect| <= atol + rtol * |expect|`` (NaN fails), on the CPU in fp32."""
    got, expect = got.detach().float().cpu(), expect.detach().float().cpu()
    if got.shape != expect.shape:
        return {"pass": False, "error": f"shape {tuple(got.shape)} != {tuple(expect.shape)}"}
    if got.numel() == 0:
        return {"pass": True, "max_abs_err": 0.0, "bad": 0, "n": 0}
    diff = (got - expect).abs()
    bound = atol + rtol * expect.abs()
    bad = ~(diff <= bound)
    worst = diff.nan_to_num(nan=math.inf)
    return {"pass": not bool(bad.any()), "max_abs_err": float(worst.max()),
            "max_err_over_tol": float((worst / bound).max()), "bad": int(bad.sum()), "n": got.numel()}


def compare_exact(got: torch.Tensor, expect: torch.Tensor) -> dict:
    got, expect = got.detach().float().cpu(), expect.detach().float().cpu()
    if got.shape != expect.shape:
        return {"pass": False, "error": f"shape {tuple(got.shape)} != {tuple(expect.shape)}"}
    bad = int((got != expect).sum())
    return {"pass": bad == 0, "bad": bad, "n": got.numel()}


class Checks:
    """Named checks accumulated over steps and layers: counts, worst error, first failure."""

    def __init__(self):
        self.items: dict[str, dict] = {}

    def add(self, name: str, result: dict, where: str, **tol) -> bool:
        item = self.items.setdefault(name, {"pass": True, "count": 0, "failures": 0, **tol})
        item["count"] += 1
        for key in ("max_abs_err", "max_err_over_tol"):
            if key in result:
                item[key] = max(item.get(key, 0.0), result[key])
        if not result["pass"]:
            item["pass"] = False
            item["failures"] += 1
            item.setdefault("first_failure", {"where": where, **{k: v for k, v in result.items() if k != "pass"}})
        return result["pass"]

    def ok(self, name: str, passed: bool, where: str, detail: str = "") -> bool:
        return self.add(name, {"pass": passed, **({"detail": detail} if detail else {})}, where)

    @property
    def passed(self) -> bool:
        return all(item["pass"] for item in self.items.values())


@contextmanager
def no_host_sync(device: torch.device):
    """On CUDA: any op that synchronises the host with the device raises."""
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def padded_rows(num_tokens: int) -> int:
    """Rows of the step's q/k/v/output as vLLM's piecewise CUDA graphs pass them: the
    token count rounded up to a captured size (a multiple of 8 here), plus a few more,
    so that there is padding even when the count is a multiple of 8."""
    return -(-num_tokens // 8) * 8 + 3


def build_device_plan(inputs, kept_table, block_size: int, device: torch.device, checks: "Checks", where: str):
    """The step's plan as engine/step_planner.py builds it: on CUDA the host-to-device copy
    staged in pinned memory, non-blocking. Under the sync guard: the plan is host work on
    host tensors (which the guard does not flag), and the pinned non-blocking copy must
    not wait for the device. Should it sync, the check fails and the plan is built again
    without the guard, so that the rest of the step is still checked."""
    pin = device.type == "cuda"
    try:
        with no_host_sync(device):
            plan = core.plan.build_step_plan(inputs, kept_table, block_size, device, pin_memory=pin)
    except RuntimeError as e:
        if device.type != "cuda" or "synchroniz" not in str(e).lower():
            raise
        checks.ok("no_host_sync_in_plan", False, where, str(e).splitlines()[0])
        return core.plan.build_step_plan(inputs, kept_table, block_size, device, pin_memory=pin)
    if device.type == "cuda":
        checks.ok("no_host_sync_in_plan", True, where)
    return plan


def sync_guard_works(device: torch.device) -> bool:
    """The guard catches a host sync (``.item()``) on this device."""
    x = torch.ones(2, device=device)
    try:
        with no_host_sync(device):
            x.sum().item()
    except RuntimeError:
        return True
    return False


# ----------------------------------------------------------------------------- scenario


def make_budgets(shape: Shape, seed: int):
    """HeadKV budgets from random, strongly skewed head scores (half the heads 0, a heavy
    tail): per layer, heads keep from a few tokens to more than the prompt."""
    rng = random.Random(seed)
    scores = [[rng.paretovariate(1.2) if rng.random() < 0.5 else 0.0 for _ in range(shape.num_kv_heads)]
              for _ in range(shape.layers)]
    config = core.config.HeadKVConfig(kv_size=shape.kv_size, policy="headkv", window=shape.window,
                                      pool_kernel=shape.pool_kernel)
    return core.budgets.policy_budgets(config, shape.layers, shape.num_kv_heads, scores)


class Scenario:
    """Requests prefilled at their arrival step (prompt + tokens generated before a
    preemption), then decoded one token a step; before it a padding row. Block-table
    rows are filled as a scheduler would: the pages in use are a prefix of the
    canonical order, each a random free page id of one pool shared by all layers."""

    def __init__(self, shape: Shape, budgets, seed: int):
        self.shape, self.budgets = shape, budgets
        self.gen = torch.Generator().manual_seed(seed)
        final = [self._pages(layer, r, prompt + gen + max(0, shape.steps - 1 - arrives))
                 for layer in range(shape.layers) for r, (prompt, gen, arrives) in enumerate(shape.requests)
                 if arrives < shape.steps]
        self.num_blocks = 1 + sum(final) + 8  # block 0 is the null block
        self.free = (torch.randperm(self.num_blocks - 1, generator=self.gen) + 1).tolist()
        width = max(final) + 2
        self.tables = [torch.zeros(len(shape.requests), width, dtype=torch.int32) for _ in range(shape.layers)]
        self.held = [[0] * len(shape.requests) for _ in range(shape.layers)]
        self.total = [0] * len(shape.requests)

    def _pages(self, layer: int, r: int, total: int) -> int:
        prompt = self.shape.requests[r][0]
        kept = self.budgets.kept(prompt)[layer]
        return sum(-(-(min(k, prompt) + total - prompt) // self.shape.block_size) for k in kept)

    def step(self, step: int):
        """The step's inputs and what each request does: ``("prefill", start, prompt, generated)``,
        ``("decode", row)`` or None."""
        qlens, kinds, start = [], [], 0
        for r, (prompt, generated, arrives) in enumerate(self.shape.requests):
            q = prompt + generated if step == arrives else (1 if step > arrives else 0)
            self.total[r] += q
            kinds.append(("prefill", start, prompt, generated) if step == arrives else
                         ("decode", start) if q else None)
            qlens.append(q)
            start += q
            if not q:
                continue
            for layer in range(self.shape.layers):
                need = self._pages(layer, r, self.total[r])
                while self.held[layer][r] < need:
                    self.tables[layer][r, self.held[layer][r]] = self.free.pop()
                    self.held[layer][r] += 1
        qsl = torch.tensor([0] + qlens).cumsum(0).int()
        inputs = core.plan.StepInputs(
            query_start_loc=qsl, seq_lens=torch.tensor(self.total),
            prompt_lens=torch.tensor([p for p, _, _ in self.shape.requests]), num_actual_tokens=int(qsl[-1]))
        return inputs, kinds

    def qkv(self, num_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """[T, (Hq + 2 Hkv) d], as a fused QKV projection gives them (q, k, v are strided views)."""
        s = self.shape
        cols = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
        if device is None:
            return torch.randn(num_tokens, cols, generator=self.gen)
        return torch.randn(num_tokens, cols, device=device, dtype=dtype)


def split_qkv(qkv: torch.Tensor, shape: Shape):
    d = shape.head_dim
    return qkv.split([shape.num_heads * d, shape.num_kv_heads * d, shape.num_kv_heads * d], dim=1)


def make_attention(shape: Shape, use_triton: bool | None, replay: bool):
    """``HeadAttention`` that records (device route) or replays (reference route) the
    window scores of each prefill, in the forward's order."""
    base = core.attention.HeadAttention

    @dataclasses.dataclass(frozen=True)
    class ScoreTape(base):
        tape: list = dataclasses.field(default_factory=list, compare=False)
        replay: bool = False

        def _window_scores(self, q_win, k, *rest):
            if self.replay:
                return self.tape.pop(0)
            scores = super()._window_scores(q_win, k, *rest)
            self.tape.append(scores)
            return scores

    kw = {"use_triton": use_triton} if "use_triton" in {f.name for f in dataclasses.fields(base)} else {}
    return ScoreTape(shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.head_dim ** -0.5,
                     shape.pool_kernel, replay=replay, **kw)


# ----------------------------------------------------------------------------- oracle


class Oracle:
    """Each head's kept K/V rows from first principles (docs/method.md): the top
    ``kept - window`` prefix positions by score (ties: lower position first) in
    position order, the window, then every later token; and plain attention over them."""

    def __init__(self, shape: Shape, budgets):
        self.shape, self.budgets = shape, budgets
        self.heads: dict[tuple[int, int], list[list[torch.Tensor]]] = {}  # (layer, r) -> [K list, V list]

    def _group(self, h: int) -> slice:
        g = self.shape.num_heads // self.shape.num_kv_heads
        return slice(h * g, (h + 1) * g)

    def needs_scores(self, layer: int, prompt: int) -> bool:
        return any(k < prompt for k in self.budgets.kept(prompt)[layer])

    def kept_positions(self, layer: int, prompt: int, scores: torch.Tensor | None) -> list[torch.Tensor]:
        w = min(self.shape.window, prompt)
        out = []
        for h, kept in enumerate(self.budgets.kept(prompt)[layer]):
            if kept >= prompt:
                out.append(torch.arange(prompt))
                continue
            order = scores[h].sort(descending=True, stable=True).indices[: kept - w]
            out.append(torch.cat([order.sort().values, torch.arange(prompt - w, prompt)]))
        return out

    def prefill(self, layer: int, r: int, q, k, v, prompt: int, scores, rows: torch.Tensor):
        """q [T, Hq, d], k/v [T, Hkv, d] the request's step tokens (prompt, then generated).
        Returns (prompt outputs at ``rows`` [len(rows), Hq, d], generated outputs [g, Hq, d])."""
        scale = self.shape.head_dim ** -0.5
        t = q.shape[0]
        prompt_out = torch.empty(len(rows), *q.shape[1:])
        gen_out = torch.empty(t - prompt, *q.shape[1:])
        keep = self.kept_positions(layer, prompt, scores)
        lists = [[], []]
        for h in range(self.shape.num_kv_heads):
            g = self._group(h)
            for a in range(0, len(rows), 512):
                rr = rows[a : a + 512]
                logits = torch.einsum("rgd,nd->rgn", q[rr, g], k[:prompt, h]) * scale
                logits.masked_fill_(torch.arange(prompt)[None, None, :] > rr[:, None, None], float("-inf"))
                prompt_out[a : a + 512, g] = torch.einsum("rgn,nd->rgd", logits.softmax(-1), v[:prompt, h])
            K = torch.cat([k[keep[h], h], k[prompt:, h]])
            V = torch.cat([v[keep[h], h], v[prompt:, h]])
            base = len(keep[h])
            for j in range(t - prompt):
                logits = q[prompt + j, g] @ K[: base + j + 1].T * scale
                gen_out[j, g] = logits.softmax(-1) @ V[: base + j + 1]
            lists[0].append(K)
            lists[1].append(V)
        self.heads[(layer, r)] = lists
        return prompt_out, gen_out

    def decode(self, layer: int, r: int, q, k, v) -> torch.Tensor:
        """q [Hq, d], k/v [Hkv, d] one token: appended to every head, then attention."""
        scale = self.shape.head_dim ** -0.5
        keys, values = self.heads[(layer, r)]
        out = torch.empty_like(q)
        for h in range(self.shape.num_kv_heads):
            keys[h] = torch.cat([keys[h], k[h][None]])
            values[h] = torch.cat([values[h], v[h][None]])
            g = self._group(h)
            out[g] = (q[g] @ keys[h].T * scale).softmax(-1) @ values[h]
        return out

    def held(self, layer: int, r: int):
        return self.heads[(layer, r)]


def head_slots(table_row: torch.Tensor, kept: tuple[int, ...], lengths: list[int], block_size: int):
    """Slots of each head's positions from ``method.layout.page_positions`` (not the kernels' helper)."""
    max_pages = max(1, max(-(-n // block_size) for n in lengths))
    pos = core.layout.page_positions(torch.tensor([kept], dtype=torch.long), block_size, max_pages)[0]
    out = []
    for h, n in enumerate(lengths):
        p = torch.arange(n)
        out.append(table_row.long()[pos[h, p // block_size]] * block_size + p % block_size)
    return out


def prompt_rows(prompt: int, window: int, limit: int | None) -> torch.Tensor:
    if limit is None or prompt <= limit:
        return torch.arange(prompt)
    spread = torch.linspace(0, prompt - 1, limit - window).round().long()
    return torch.unique(torch.cat([spread, torch.arange(prompt - window, prompt)]))


# ----------------------------------------------------------------------------- one case


def resolve_use_triton(device: torch.device, kernels: str) -> bool | None:
    """The device store's ``use_triton``: None on CUDA (Triton); on the CPU True (the
    Triton interpreter) or False (the references)."""
    if kernels == "reference":
        return False
    if device.type == "cuda":
        return None
    return True


def run_case(shape: Shape, dtype: torch.dtype, device: torch.device, kernels: str = "triton", seed: int = 0,
             store_factory=None, time_reps: int = 20) -> dict:
    """One scenario in one dtype: device route vs reference route vs oracle. ``store_factory``
    (block_size, device, use_triton) replaces the device route's page store (tests feed broken ones)."""
    started = time.perf_counter()
    use_triton = resolve_use_triton(device, kernels)
    budgets = make_budgets(shape, seed)
    scenario = Scenario(shape, budgets, seed)
    bs, hq, hkv, d = shape.block_size, shape.num_heads, shape.num_kv_heads, shape.head_dim
    dev_store = (store_factory or core.page_store.BlockTablePageStore)(bs, device, use_triton=use_triton)
    ref_store = core.page_store.BlockTablePageStore(bs, "cpu", use_triton=False)
    dev_attn = make_attention(shape, use_triton, replay=False)
    ref_attn = make_attention(shape, False, replay=True)
    pages_dev = torch.zeros(scenario.num_blocks, 2, bs, d, dtype=dtype, device=device)
    pages_ref = torch.zeros(scenario.num_blocks, 2, bs, d)
    kept_table = core.plan.KeptTable(budgets)
    oracle = Oracle(shape, budgets)
    checks = Checks()
    tol = OUTPUT_TOL[dtype]
    LayerStep = core.attention.LayerStep
    plan_ms, selection_differs, last = [], 0, None
    kept_caps = [c + shape.window for row in budgets.caps for c in row]

    def steps():
        nonlocal selection_differs, last
        for step in range(shape.steps):
            inputs, kinds = scenario.step(step)
            t0 = time.perf_counter()
            plan_dev = build_device_plan(inputs, kept_table, bs, device, checks, f"step {step}")
            plan_ms.append(1e3 * (time.perf_counter() - t0))
            plan_ref = core.plan.build_step_plan(inputs, kept_table, bs, "cpu")
            tables_dev = [t.to(device) for t in scenario.tables]
            decode_only = all(k is None or k[0] == "decode" for k in kinds)
            step_inputs = []
            for layer in range(shape.layers):
                where = f"step {step} layer {layer}"
                num_tokens = inputs.num_actual_tokens
                qkv = scenario.qkv(num_tokens).to(dtype)  # the inputs both routes get
                # the device route's, padded as under CUDA graphs: NaN rows after the real ones
                padded = padded_rows(num_tokens)
                pad = torch.full((padded - num_tokens, qkv.shape[1]), math.nan, dtype=dtype)
                q_dev, k_dev, v_dev = split_qkv(torch.cat([qkv, pad]).to(device), shape)
                q_ref, k_ref, v_ref = (x.float().contiguous() for x in split_qkv(qkv, shape))
                out_dev = torch.full((padded, hq * d), OUTPUT_SENTINEL, dtype=dtype, device=device)
                dev_attn.tape.clear()
                try:
                    with no_host_sync(device):
                        state = dev_store.layer_state(plan_dev, layer, tables_dev[layer])
                        dev_attn.forward(LayerStep(plan_dev, layer, dev_store, state), q_dev, k_dev, v_dev,
                                         pages_dev, out_dev)
                except RuntimeError as e:
                    if device.type == "cuda" and "synchroniz" in str(e).lower():
                        checks.ok("no_host_sync_in_forward", False, where, str(e).splitlines()[0])
                    raise
                if device.type == "cuda":
                    checks.ok("no_host_sync_in_forward", True, where)
                checks.add("padding_rows_untouched",
                           compare_exact(out_dev[num_tokens:], torch.full_like(out_dev[num_tokens:], OUTPUT_SENTINEL)),
                           where)
                if decode_only:
                    step_inputs.append((plan_dev, tables_dev[layer], q_dev, k_dev, v_dev, out_dev))
                scores = [s.float().cpu() for s in dev_attn.tape]

                # reference route, replaying the device's scores
                ref_attn.tape[:] = list(scores)
                out_ref = torch.zeros(inputs.num_actual_tokens, hq * d)
                state = ref_store.layer_state(plan_ref, layer, scenario.tables[layer])
                ref_attn.forward(LayerStep(plan_ref, layer, ref_store, state), q_ref, k_ref, v_ref, pages_ref, out_ref)
                checks.ok("scores_replayed", not ref_attn.tape, where, f"{len(ref_attn.tape)} left")

                q3, k3, v3 = q_ref.view(-1, hq, d), k_ref.view(-1, hkv, d), v_ref.view(-1, hkv, d)
                od, orf = out_dev.view(-1, hq, d), out_ref.view(-1, hq, d)
                scored = iter(scores)
                for r, kind in enumerate(kinds):
                    if kind is None:
                        continue
                    at = f"{where} request {r}"
                    if kind[0] == "decode":
                        row = kind[1]
                        checks.add("output_decode_vs_reference", compare(od[row], orf[row], **tol), at, **tol)
                        expect = oracle.decode(layer, r, q3[row], k3[row], v3[row])
                        checks.add("reference_decode_vs_oracle", compare(orf[row], expect, **ORACLE_TOL), at, **ORACLE_TOL)
                        continue
                    _, start, prompt, generated = kind
                    end, t = start + prompt, prompt + generated
                    w = min(shape.window, prompt)
                    s = None
                    if oracle.needs_scores(layer, prompt):
                        s = next(scored, None)
                        if not checks.ok("scores_per_prefill", s is not None and s.shape == (hkv, prompt - w), at):
                            raise AssertionError(f"{at}: no window scores of shape {(hkv, prompt - w)} recorded")
                        expect = core.window_scores.window_scores_ref(q3[end - w : end], k3[start:end], d ** -0.5,
                                                                       shape.pool_kernel)
                        checks.add("scores_vs_reference", compare(s, expect, **SCORE_TOL), at, **SCORE_TOL)
                        mine = oracle.kept_positions(layer, prompt, s)
                        theirs = oracle.kept_positions(layer, prompt, expect)
                        selection_differs += sum(not torch.equal(a, b) for a, b in zip(mine, theirs))
                    checks.add("output_prompt_vs_reference", compare(od[start:end], orf[start:end], **tol), at, **tol)
                    rows = prompt_rows(prompt, w, shape.oracle_prompt_rows)
                    p_out, g_out = oracle.prefill(layer, r, q3[start : start + t], k3[start : start + t],
                                                  v3[start : start + t], prompt, s, rows)
                    checks.add("reference_prompt_vs_oracle", compare(orf[start + rows], p_out, **ORACLE_TOL), at,
                               **ORACLE_TOL)
                    if generated:
                        checks.add("output_recomputed_vs_reference",
                                   compare(od[end : start + t], orf[end : start + t], **tol), at, **tol)
                        checks.add("reference_recomputed_vs_oracle", compare(orf[end : start + t], g_out, **ORACLE_TOL),
                                   at, **ORACLE_TOL)
                checks.ok("scores_per_prefill", next(scored, None) is None, where, "more scores than prefills to score")

            # After every layer of the step: the pools, and each head's kept tokens.
            checks.add("pages_vs_reference", compare_exact(pages_dev, pages_ref), f"step {step}")
            for layer in range(shape.layers):
                for r, (prompt, _, arrives) in enumerate(shape.requests):
                    if arrives > step:
                        continue
                    keys, values = oracle.held(layer, r)
                    lengths = [x.shape[0] for x in keys]
                    at = f"step {step} layer {layer} request {r}"
                    checks.ok("plan_lengths_vs_oracle", plan_ref.layout.lengths_host[layer, r].tolist() == lengths, at,
                              f"plan {plan_ref.layout.lengths_host[layer, r].tolist()} oracle {lengths}")
                    slots = head_slots(scenario.tables[layer][r], budgets.kept(prompt)[layer], lengths, bs)
                    for h, sl in enumerate(slots):
                        held = pages_ref[sl // bs, :, sl % bs]  # [n, 2, d]
                        checks.add("reference_pages_vs_oracle",
                                   compare_exact(held, torch.stack([keys[h], values[h]], 1)), f"{at} head {h}")
            last = (step_inputs, plan_dev) if decode_only and step_inputs else last

    error = None
    try:
        steps()
    except Exception as e:  # the checks so far still go into the result
        error = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}

    result = {
        "shape": dataclasses.asdict(shape), "dtype": str(dtype).replace("torch.", ""), "device": str(device),
        "kernels": "triton" if use_triton is not False else "reference",
        "pass": checks.passed and error is None, "checks": checks.items, **(error or {}),
        "selection_differs_with_reference_scores": selection_differs,
        "budgets": {"kept_min": min(kept_caps), "kept_max": max(kept_caps),
                    "kept_mean": round(sum(kept_caps) / len(kept_caps), 1)},
        "plan_build_ms": [round(x, 3) for x in plan_ms],
        "page_pool_blocks": scenario.num_blocks,
    }
    if device.type == "cuda" and last is not None and error is None:
        result["decode_step"] = time_decode_step(dev_store, dev_attn, last[0], pages_dev, time_reps)
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def time_decode_step(store, attention, layers, pages, reps: int) -> dict:
    """CUDA-event time of a decode-only step's forward over every layer (rewrites the
    same tokens at the same positions)."""
    LayerStep = core.attention.LayerStep

    def step():
        for layer, (plan, table, q, k, v, out) in enumerate(layers):
            state = store.layer_state(plan, layer, table)
            attention.forward(LayerStep(plan, layer, store, state), q, k, v, pages, out)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        step()
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / reps
    plan = layers[0][0]
    lengths = plan.layout.lengths_host[:, plan.decode.reqs_host]
    return {"ms_per_step": round(ms, 4), "ms_per_layer": round(ms / len(layers), 4), "layers": len(layers),
            "decodes": int(plan.num_decodes), "head_tokens_mean": round(float(lengths.float().mean()), 1),
            "head_tokens_max": int(lengths.max()), "reps": reps}


def run_timing(requests: int, prompt: int, kv_size: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """Decode-only step at Llama shapes with ``requests`` prompts of ``prompt`` tokens: device only, no reference."""
    base = SHAPES["llama"]
    shape = dataclasses.replace(base, name=f"timing-{requests}x{prompt}-kv{kv_size}", layers=4,
                                requests=tuple((prompt, 0, 0) for _ in range(requests)), steps=2, kv_size=kv_size)
    budgets = make_budgets(shape, seed)
    scenario = Scenario(shape, budgets, seed)
    store = core.page_store.BlockTablePageStore(shape.block_size, device)
    attention = make_attention(shape, None, replay=False)
    pages = torch.zeros(scenario.num_blocks, 2, shape.block_size, shape.head_dim, dtype=dtype, device=device)
    kept_table = core.plan.KeptTable(budgets)
    layers = []
    for step in range(2):
        inputs, _ = scenario.step(step)
        plan = core.plan.build_step_plan(inputs, kept_table, shape.block_size, device, pin_memory=True)
        for layer in range(shape.layers):
            table = scenario.tables[layer].to(device)
            q, k, v = split_qkv(scenario.qkv(inputs.num_actual_tokens, device, dtype), shape)
            out = torch.zeros(inputs.num_actual_tokens, shape.num_heads * shape.head_dim, dtype=dtype, device=device)
            with no_host_sync(device):
                state = store.layer_state(plan, layer, table)
                attention.forward(core.attention.LayerStep(plan, layer, store, state), q, k, v, pages, out)
            attention.tape.clear()
            if step == 1:
                if not bool(torch.isfinite(out).all()):
                    raise AssertionError(f"{shape.name}: non-finite decode output")
                layers.append((plan, table, q, k, v, out))
    result = {"name": shape.name, "dtype": str(dtype).replace("torch.", ""), "kv_size": kv_size,
              **time_decode_step(store, attention, layers, pages, 20)}
    del pages, layers
    torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------- driver


def run(device: torch.device, shapes: list[str], dtypes: list[str], kernels: str = "triton", seed: int = 0,
        budget_s: float | None = None, timing: bool = True, store_factory=None, log=print) -> dict:
    """Every (shape, dtype) case; float16 cases are optional: skipped, not failed, when
    the time budget runs out."""
    started = time.perf_counter()
    info = {"device": str(device), "torch": torch.__version__, "python": sys.version.split()[0],
            "kernels": kernels, "seed": seed, "triton_interpret": os.environ.get("TRITON_INTERPRET")}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["sync_guard_works"] = sync_guard_works(device)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    order = sorted(((s, t) for s in shapes for t in dtypes), key=lambda c: (c[1] == "float16", shapes.index(c[0])))
    cases, took = [], {}
    for shape_name, dtype_name in order:
        optional = dtype_name == "float16"
        elapsed = time.perf_counter() - started
        if budget_s is not None and elapsed + took.get(shape_name, 0.0) > budget_s:
            cases.append({"shape": {"name": shape_name}, "dtype": dtype_name, "pass": optional,
                          "skipped": f"time budget ({budget_s:.0f} s) spent", "optional": optional})
            log(f"{shape_name:>6} {dtype_name:<9} SKIPPED (time budget)")
            continue
        try:
            case = run_case(SHAPES[shape_name], DTYPES[dtype_name], device, kernels, seed, store_factory)
        except Exception as e:  # a crash fails the case; the others still run
            case = {"shape": {"name": shape_name}, "dtype": dtype_name, "pass": False,
                    "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        case["optional"] = optional
        took[shape_name] = max(took.get(shape_name, 0.0), case.get("seconds", 0.0))
        cases.append(case)
        failed = [n for n, c in case.get("checks", {}).items() if not c["pass"]]
        log(f"{shape_name:>6} {dtype_name:<9} {'PASS' if case['pass'] else 'FAIL'}"
            f"  {case.get('seconds', 0):6.1f} s" + (f"  failed: {', '.join(failed)}" if failed else "")
            + (f"  {case['error']}" if "error" in case else "")
            + (f"  decode step {case['decode_step']['ms_per_layer']:.3f} ms/layer" if "decode_step" in case else ""))
    timings = []
    if timing and device.type == "cuda":
        for requests, prompt, kv_size in TIMINGS:
            if budget_s is not None and time.perf_counter() - started > budget_s:
                break
            try:
                t = run_timing(requests, prompt, kv_size, torch.bfloat16, device, seed)
            except Exception as e:  # information only
                t = {"name": f"timing-{requests}x{prompt}-kv{kv_size}", "error": f"{type(e).__name__}: {e}"}
            timings.append(t)
            log(f"timing {t['name']}: " + (f"{t['ms_per_layer']:.3f} ms/layer" if "ms_per_layer" in t else t["error"]))
    passed = bool(cases) and all(c["pass"] for c in cases) and info.get("sync_guard_works", True)
    return {**info, "pass": passed, "cases": cases, "decode_timings": timings,
            "seconds": round(time.perf_counter() - started, 1)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--kernels", choices=["triton", "reference"], default="triton",
                        help="device route ops; on the CPU 'triton' runs them in Triton's interpreter")
    parser.add_argument("--shapes", default=None, help=f"comma-separated, of {', '.join(SHAPES)} "
                        "(default: small,llama on CUDA, tiny on the CPU)")
    parser.add_argument("--dtypes", default=None, help="comma-separated (default: bfloat16,float32,float16 on "
                        "CUDA, float32,bfloat16 on the CPU)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no case past this many seconds")
    parser.add_argument("--no-timing", action="store_true", help="skip the decode timings without reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if (args.device == "auto" and cuda) or args.device == "cuda" else "cpu")
    if device.type == "cuda" and not cuda:
        print("gpu_step_check.py: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if device.type == "cpu" and args.kernels == "triton":
        # The Triton launchers on CPU tensors: Triton's interpreter, set before the kernels are imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    shapes = (args.shapes or ("small,llama" if device.type == "cuda" else "tiny")).split(",")
    dtypes = (args.dtypes or ("bfloat16,float32,float16" if device.type == "cuda" else "float32,bfloat16")).split(",")
    for name in shapes:
        if name not in SHAPES:
            print(f"gpu_step_check.py: unknown shape {name!r}; use {', '.join(SHAPES)}", file=sys.stderr)
            return 2
    for name in dtypes:
        if name not in DTYPES:
            print(f"gpu_step_check.py: unknown dtype {name!r}; use {', '.join(DTYPES)}", file=sys.stderr)
            return 2
    result = run(device, shapes, dtypes, args.kernels, args.seed, args.budget_s, timing=not args.no_timing)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.out:  # the file's name only: no machine paths in the result
        argv = [args.out.name if a == str(args.out) else a for a in argv]
    result["command"] = " ".join(["python", "scripts/gpu_step_check.py", *argv])
    print(f"gpu_step_check: {'PASS' if result['pass'] else 'FAIL'} ({result['seconds']} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
