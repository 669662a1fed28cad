"""HeadKV steps through the compute core (``headkv_vllm.core``), as the engine drives
it, on a device, checked against two references (tests/gpu/test_step_harness.py).

Per step the plan (``core.plan.build_step_plan``, the attention metadata), then per
layer the page store's ``layer_state`` and ``HeadAttention.forward`` over one page pool
shared by all layers. Three routes see the same dtype-rounded inputs:

- the device route: the store under test on the device (the Triton kernels on CUDA;
  on the CPU the Triton kernels in Triton's interpreter, or the PyTorch references),
  q/k/v/output padded as under vLLM's piecewise CUDA graphs (``padded_rows``: NaN
  input rows, output rows holding ``OUTPUT_SENTINEL``), the plan built as the engine
  builds it on CUDA (pinned memory, non-blocking copy). On CUDA the plan, and
  ``layer_state`` + ``forward``, run under ``torch.cuda.set_sync_debug_mode("error")``;
- the reference route: the same step on the CPU in fp32 with the kernels' PyTorch
  references. It replays the device's window scores (``ScoreTape``), so that both
  select the same tokens even where two scores tie within rounding (how often the
  selection would differ is counted, not checked);
- the oracle (``support.step_oracle``): kept-token lists and plain attention.

``run_case`` returns the named checks (``support.step_checks.Checks``) and any error.
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from contextlib import contextmanager

import torch

from headkv_vllm.core.attention import HeadAttention, LayerStep
from headkv_vllm.core.page_store import BlockTablePageStore
from headkv_vllm.core.plan import KeptTable, StepInputs, StepPlan, build_step_plan
from headkv_vllm.kernels.window_scores import window_scores_ref
from support.step_checks import (ORACLE_TOL, OUTPUT_SENTINEL, OUTPUT_TOL, SCORE_TOL, Checks, compare, compare_exact,
                                 is_host_sync_error, no_host_sync)
from support.step_oracle import Oracle, head_slots, prompt_rows
from support.step_scenario import Decode, Prefill, Scenario, Shape, make_budgets, padded_rows, split_qkv

# The checks every case runs (at least once) on any device; CUDA adds the sync checks.
CHECKS_DEVICE_VS_REFERENCE = ("output_prompt_vs_reference", "output_recomputed_vs_reference",
                              "output_decode_vs_reference", "scores_vs_reference", "scores_per_prefill",
                              "scores_replayed", "pages_vs_reference")
CHECKS_REFERENCE_VS_ORACLE = ("reference_prompt_vs_oracle", "reference_recomputed_vs_oracle",
                              "reference_decode_vs_oracle", "reference_pages_vs_oracle", "plan_lengths_vs_oracle")
CHECKS_CUDA = ("no_host_sync_in_plan", "no_host_sync_in_forward")


class ScoreTape:
    """A page store that records the window scores each prefill stores with, by request
    row (``replay=False``), or stores with the scores put in ``scores`` instead of its
    own (``replay=True``). Everything else is the wrapped store's."""

    def __init__(self, store, replay: bool):
        self.store, self.replay = store, replay
        self.scores: dict[int, torch.Tensor] = {}

    def __getattr__(self, name):
        return getattr(self.store, name)

    def store_prefill(self, state, pf, scores, k, v, pages) -> None:
        if self.replay:
            scores = self.scores.pop(pf.row).to(scores.device)
        else:
            self.scores[pf.row] = scores
        self.store.store_prefill(state, pf, scores, k, v, pages)


@dataclasses.dataclass
class StepRows:
    """One layer's step tokens: the inputs (fp32) and both routes' outputs, [T, heads, d]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    device_out: torch.Tensor
    reference_out: torch.Tensor


@dataclasses.dataclass
class CaseResult:
    dtype: torch.dtype
    checks: Checks
    error: str | None  # the exception that stopped the case, with its traceback's tail
    selection_differs: int  # heads whose kept tokens the reference route's own scores would change
    info: dict  # budgets, plan build times, page pool size, seconds


def plan_lengths(plan: StepPlan, layer: int, row: int) -> list[int]:
    """Tokens each head of ``row`` holds at ``layer`` after the step, as the plan says."""
    return plan.layout.lengths_host[layer, row].tolist()


def run_case(shape: Shape, dtype: torch.dtype, device: torch.device, kernels: str = "triton", seed: int = 0,
             store_factory=BlockTablePageStore) -> CaseResult:
    """One scenario in one dtype: device route vs reference route vs oracle. ``kernels``:
    ``triton`` (on the CPU in Triton's interpreter) or ``reference``. ``store_factory``
    (block_size, device, use_triton) makes the device route's page store (tests feed broken ones)."""
    started = time.perf_counter()
    run = StepRun(shape, dtype, device, kernels, seed, store_factory)
    error = None
    try:
        for step in range(shape.steps):
            run.step(step)
    except Exception as e:  # the checks so far still count
        error = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
    info = {**run.info(), "seconds": round(time.perf_counter() - started, 2)}
    return CaseResult(dtype, run.checks, error, run.selection_differs, info)


class StepRun:
    """A scenario's state across steps: both routes' stores and pools, the oracle, the checks."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device: torch.device, kernels: str, seed: int,
                 store_factory):
        self.shape, self.dtype, self.device = shape, dtype, device
        self.budgets = make_budgets(shape, seed)
        self.scenario = Scenario(shape, self.budgets, seed)
        bs, d = shape.block_size, shape.head_dim
        use_triton = False if kernels == "reference" else (None if device.type == "cuda" else True)
        self.device_store = ScoreTape(store_factory(bs, device, use_triton=use_triton), replay=False)
        self.reference_store = ScoreTape(BlockTablePageStore(bs, "cpu", use_triton=False), replay=True)
        self.attention = HeadAttention(shape.num_heads, shape.num_kv_heads, d, d ** -0.5, shape.pool_kernel)
        self.device_pages = torch.zeros(self.scenario.num_blocks, 2, bs, d, dtype=dtype, device=device)
        self.reference_pages = torch.zeros(self.scenario.num_blocks, 2, bs, d)
        self.kept_table = KeptTable(self.budgets)
        self.oracle = Oracle(shape, self.budgets)
        self.checks = Checks()
        self.selection_differs = 0
        self.plan_ms: list[float] = []

    def info(self) -> dict:
        kept = [c + self.shape.window for row in self.budgets.caps for c in row]
        return {"kept_min": min(kept), "kept_max": max(kept), "kept_mean": round(sum(kept) / len(kept), 1),
                "plan_build_ms": [round(x, 3) for x in self.plan_ms], "page_pool_blocks": self.scenario.num_blocks}

    def step(self, step: int) -> None:
        inputs, kinds = self.scenario.step(step)
        device_plan = self._device_plan(inputs, f"step {step}")
        reference_plan = build_step_plan(inputs, self.kept_table, self.shape.block_size, "cpu")
        tables = [t.to(self.device) for t in self.scenario.tables]
        for layer in range(self.shape.layers):
            where = f"step {step} layer {layer}"
            rows, scores = self._forward(where, layer, inputs, device_plan, reference_plan, tables[layer])
            prefills = {r for r, kind in enumerate(kinds) if isinstance(kind, Prefill)}
            self.checks.ok("scores_per_prefill", set(scores) == prefills, where,
                           f"scores of rows {sorted(scores)}, prefills in rows {sorted(prefills)}")
            for r, kind in enumerate(kinds):
                if isinstance(kind, Decode):
                    self._check_decode(f"{where} request {r}", layer, r, kind, rows)
                elif isinstance(kind, Prefill):
                    self._check_prefill(f"{where} request {r}", layer, r, kind, rows, scores.get(r))
        self.checks.add("pages_vs_reference", compare_exact(self.device_pages, self.reference_pages), f"step {step}")
        self._check_held(step, reference_plan)

    @contextmanager
    def _no_host_sync(self, name: str, where: str):
        """CUDA's sync guard, its outcome recorded as check ``name`` (on CUDA only)."""
        if self.device.type != "cuda":
            yield
            return
        try:
            with no_host_sync(self.device):
                yield
        except RuntimeError as e:
            if is_host_sync_error(e):
                self.checks.ok(name, False, where, str(e).splitlines()[0])
            raise
        self.checks.ok(name, True, where)

    def _device_plan(self, inputs: StepInputs, where: str) -> StepPlan:
        """The plan as engine/step_planner.py builds it on CUDA: the host-to-device copy staged
        in pinned memory, non-blocking, which must not wait for the device. Should it sync, the
        check fails and the plan is built again without the guard, so that the step still runs."""
        t0 = time.perf_counter()

        def build():
            return build_step_plan(inputs, self.kept_table, self.shape.block_size, self.device,
                                   pin_memory=self.device.type == "cuda")

        try:
            with self._no_host_sync("no_host_sync_in_plan", where):
                plan = build()
        except RuntimeError as e:
            if not is_host_sync_error(e):
                raise
            plan = build()
        self.plan_ms.append(1e3 * (time.perf_counter() - t0))
        return plan

    def _forward(self, where: str, layer: int, inputs: StepInputs, device_plan: StepPlan, reference_plan: StepPlan,
                 table: torch.Tensor) -> tuple[StepRows, dict[int, torch.Tensor]]:
        """The layer on both routes; the device's window scores by request row (fp32, CPU)."""
        qkv = self.scenario.qkv(inputs.num_actual_tokens).to(self.dtype)  # the inputs both routes get
        device_out = self._device_forward(where, layer, device_plan, table, qkv)
        scores = {r: s.float().cpu() for r, s in self.device_store.scores.items()}
        q, k, v = (x.float().contiguous() for x in split_qkv(qkv, self.shape))
        reference_out = torch.zeros_like(q)
        self.reference_store.scores = dict(scores)
        state = self.reference_store.layer_state(reference_plan, layer, self.scenario.tables[layer])
        step = LayerStep(reference_plan, layer, self.reference_store, state)
        self.attention.forward(step, q, k, v, self.reference_pages, reference_out)
        self.checks.ok("scores_replayed", not self.reference_store.scores, where,
                       f"scores of rows {sorted(self.reference_store.scores)} not used")
        s = self.shape
        return StepRows(q.view(-1, s.num_heads, s.head_dim), k.view(-1, s.num_kv_heads, s.head_dim),
                        v.view(-1, s.num_kv_heads, s.head_dim), device_out.view(-1, s.num_heads, s.head_dim),
                        reference_out.view(-1, s.num_heads, s.head_dim)), scores

    def _device_forward(self, where: str, layer: int, plan: StepPlan, table: torch.Tensor,
                        qkv: torch.Tensor) -> torch.Tensor:
        """The layer on the device route, padded as under CUDA graphs; its real output rows."""
        n = qkv.shape[0]
        pad = torch.full((padded_rows(n) - n, qkv.shape[1]), math.nan, dtype=self.dtype)
        q, k, v = split_qkv(torch.cat([qkv, pad]).to(self.device), self.shape)
        out = torch.full((padded_rows(n), self.shape.num_heads * self.shape.head_dim), OUTPUT_SENTINEL,
                         dtype=self.dtype, device=self.device)
        self.device_store.scores.clear()
        with self._no_host_sync("no_host_sync_in_forward", where):
            state = self.device_store.layer_state(plan, layer, table)
            step = LayerStep(plan, layer, self.device_store, state)
            self.attention.forward(step, q, k, v, self.device_pages, out)
        self.checks.add("padding_rows_untouched", compare_exact(out[n:], torch.full_like(out[n:], OUTPUT_SENTINEL)),
                        where)
        return out[:n]

    def _check_decode(self, at: str, layer: int, r: int, kind: Decode, rows: StepRows) -> None:
        tol, i = OUTPUT_TOL[self.dtype], kind.row
        self.checks.add("output_decode_vs_reference", compare(rows.device_out[i], rows.reference_out[i], **tol), at,
                        **tol)
        expect = self.oracle.decode(layer, r, rows.q[i], rows.k[i], rows.v[i])
        self.checks.add("reference_decode_vs_oracle", compare(rows.reference_out[i], expect, **ORACLE_TOL), at,
                        **ORACLE_TOL)

    def _check_prefill(self, at: str, layer: int, r: int, kind: Prefill, rows: StepRows, scores) -> None:
        tol = OUTPUT_TOL[self.dtype]
        start, end, stop = kind.start, kind.start + kind.prompt, kind.start + kind.prompt + kind.generated
        scores = self._check_scores(at, layer, kind, rows, scores)
        self.checks.add("output_prompt_vs_reference",
                        compare(rows.device_out[start:end], rows.reference_out[start:end], **tol), at, **tol)
        sample = prompt_rows(kind.prompt, min(self.shape.window, kind.prompt), self.shape.oracle_prompt_rows)
        prompt_out, generated_out = self.oracle.prefill(layer, r, rows.q[start:stop], rows.k[start:stop],
                                                        rows.v[start:stop], kind.prompt, scores, sample)
        self.checks.add("reference_prompt_vs_oracle", compare(rows.reference_out[start + sample], prompt_out,
                                                              **ORACLE_TOL), at, **ORACLE_TOL)
        if kind.generated:
            self.checks.add("output_recomputed_vs_reference",
                            compare(rows.device_out[end:stop], rows.reference_out[end:stop], **tol), at, **tol)
            self.checks.add("reference_recomputed_vs_oracle",
                            compare(rows.reference_out[end:stop], generated_out, **ORACLE_TOL), at, **ORACLE_TOL)

    def _check_scores(self, at: str, layer: int, kind: Prefill, rows: StepRows, scores):
        """The device's window scores of a prefill against ``window_scores_ref`` on the window
        rows; None where every head keeps the whole prompt (nothing is scored)."""
        if not self.oracle.needs_scores(layer, kind.prompt):
            return None
        w, start, end = min(self.shape.window, kind.prompt), kind.start, kind.start + kind.prompt
        shape = (self.shape.num_kv_heads, kind.prompt - w)
        if not self.checks.ok("scores_per_prefill", scores is not None and scores.shape == shape, at):
            raise AssertionError(f"{at}: no window scores of shape {shape} recorded")
        expect = window_scores_ref(rows.q[end - w : end], rows.k[start:end], self.shape.head_dim ** -0.5,
                                   self.shape.pool_kernel)
        self.checks.add("scores_vs_reference", compare(scores, expect, **SCORE_TOL), at, **SCORE_TOL)
        mine = self.oracle.kept_positions(layer, kind.prompt, scores)
        theirs = self.oracle.kept_positions(layer, kind.prompt, expect)
        self.selection_differs += sum(not torch.equal(a, b) for a, b in zip(mine, theirs))
        return scores

    def _check_held(self, step: int, plan: StepPlan) -> None:
        """After every layer of the step: each head's tokens in the reference pages, at the
        slots ``method.layout`` gives them, are the oracle's list; the plan's lengths its length."""
        bs = self.shape.block_size
        for layer in range(self.shape.layers):
            for r, (prompt, _, arrives) in enumerate(self.shape.requests):
                if arrives > step:
                    continue
                keys, values = self.oracle.held(layer, r)
                lengths = [x.shape[0] for x in keys]
                at = f"step {step} layer {layer} request {r}"
                planned = plan_lengths(plan, layer, r)
                self.checks.ok("plan_lengths_vs_oracle", planned == lengths, at, f"plan {planned} oracle {lengths}")
                slots = head_slots(self.scenario.tables[layer][r], self.budgets.kept(prompt)[layer], lengths, bs)
                for h, sl in enumerate(slots):
                    held = self.reference_pages[sl // bs, :, sl % bs]  # [n, 2, d]
                    self.checks.add("reference_pages_vs_oracle",
                                    compare_exact(held, torch.stack([keys[h], values[h]], 1)), f"{at} head {h}")
