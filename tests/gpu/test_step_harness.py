"""HeadKV steps through the compute core on this machine's device, checked against the
fp32 CPU reference route and an independent oracle (tests/support/step_harness.py).

A scenario runs a few steps: step 0 prefills most requests; step 1 mixes decodes
(non-contiguous rows), a new prefill and a recomputed request (preempted after
generating tokens, prefilled again with them); later steps only decode. Every layer has
its own per-head budgets (the HeadKV policy on random head scores), so heads keep from
a few tokens to the whole prompt. q/k/v/output come padded as under vLLM's piecewise
CUDA graphs; on CUDA the plan and the forward run under CUDA's sync guard.

Scenarios (``--gpu-shapes``, tests/conftest.py): on the CPU the tiny shape in fp32 and
bf16, the Triton kernels in Triton's interpreter; on CUDA the small shape and
Llama-3-8B's attention in bf16, fp32 and fp16. Each scenario runs once per module; the
tests below read its checks. Then: broken page stores and forwards fail the harness.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from headkv_vllm.core.attention import HeadAttention
from headkv_vllm.core.page_store import BlockTablePageStore
from support.step_checks import compare, compare_exact, no_host_sync
from support.step_harness import CHECKS_CUDA, CaseResult, run_case
from support.step_scenario import DTYPES, SHAPES, padded_rows, step_cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = step_cases(metafunc.config.getoption("--gpu-shapes"), DEVICE)
        metafunc.parametrize("case", cases, ids=["-".join(c) for c in cases], indirect=True, scope="module")


@pytest.fixture(scope="module")
def case(request) -> CaseResult:
    shape, dtype = request.param
    return run_case(SHAPES[shape], DTYPES[dtype], DEVICE)


def assert_checks(case: CaseResult, *names: str) -> None:
    """The case ran to its end, and each named check ran and passed everywhere."""
    assert case.error is None, case.error
    for name in names:
        item = case.checks.items.get(name)
        assert item is not None and item["count"] > 0, f"{name}: never checked"
        assert item["pass"], f"{name}: {json.dumps(item)}"


def test_scenario_runs_every_step(case, record_property):
    assert case.error is None, case.error
    record_property("selection_differs_with_reference_scores", case.selection_differs)  # counted, not checked
    for key, value in case.info.items():
        record_property(key, value)


def test_outputs_match_the_reference_route(case):
    """Prompt rows, a recomputed request's generated tokens and decodes, within the dtype's tolerance."""
    assert_checks(case, "output_prompt_vs_reference", "output_recomputed_vs_reference", "output_decode_vs_reference")
    if case.dtype == torch.float32:
        assert case.checks.items["output_decode_vs_reference"]["max_abs_err"] <= 1e-4


def test_window_scores_match_the_reference(case):
    """One score row per prefilled prompt, equal to ``window_scores_ref`` on the window
    rows; the reference route stores with every one of them."""
    assert_checks(case, "scores_per_prefill", "scores_vs_reference", "scores_replayed")


def test_page_pool_equals_the_reference_route(case):
    """The whole pool, bit for bit, after every step (stores copy)."""
    assert_checks(case, "pages_vs_reference")


def test_reference_outputs_match_the_oracle(case):
    assert_checks(case, "reference_prompt_vs_oracle", "reference_recomputed_vs_oracle", "reference_decode_vs_oracle")


def test_reference_pages_hold_the_oracle_tokens(case):
    """Each head's tokens at the slots ``method.layout`` gives them; the plan's lengths the oracle's."""
    assert_checks(case, "reference_pages_vs_oracle", "plan_lengths_vs_oracle")


def test_padding_rows_stay_untouched(case):
    assert_checks(case, "padding_rows_untouched")


@needs_cuda
def test_plan_copy_never_syncs_the_host(case):
    """Pinned memory, non-blocking, as the engine builds the plan."""
    assert_checks(case, "no_host_sync_in_plan")


@needs_cuda
def test_forward_never_syncs_the_host(case):
    """``layer_state`` and ``forward`` under ``torch.cuda.set_sync_debug_mode("error")``."""
    assert_checks(case, "no_host_sync_in_forward")


# ----------------------------------------------------------------------------- the harness itself


def run_tiny(store=BlockTablePageStore) -> CaseResult:
    """The tiny fp32 scenario; on the CPU with the PyTorch references (the interpreter is
    slow, and the store is what differs)."""
    kernels = "triton" if DEVICE.type == "cuda" else "reference"
    return run_case(SHAPES["tiny"], torch.float32, DEVICE, kernels, store_factory=store)


class SkipsAppend(BlockTablePageStore):
    def append_decode(self, state, k, v, pages):
        pass  # decode tokens never reach the pages


class KeepsLowestScores(BlockTablePageStore):
    def store_prefill(self, state, pf, scores, k, v, pages):
        super().store_prefill(state, pf, -scores, k, v, pages)


class DecodeMissesNewestToken(BlockTablePageStore):
    def attend_decode(self, state, q, pages, scale):
        state = dataclasses.replace(state, decode_lengths=state.decode_lengths - 1)
        return super().attend_decode(state, q, pages, scale)


@pytest.mark.parametrize("store,fails", [
    (SkipsAppend, {"pages_vs_reference", "output_decode_vs_reference"}),
    (KeepsLowestScores, {"pages_vs_reference", "output_decode_vs_reference", "output_recomputed_vs_reference"}),
    (DecodeMissesNewestToken, {"output_decode_vs_reference"}),
])
def test_harness_fails_a_broken_store(store, fails):
    result = run_tiny(store)
    assert result.error is None, result.error
    assert result.checks.failed == fails
    assert all("first_failure" in result.checks.items[name] for name in fails)


def test_harness_fails_a_forward_that_writes_padding_rows(monkeypatch):
    """q/k/v/output come padded as under CUDA graphs: the rows past num_actual_tokens must stay untouched."""
    forward = HeadAttention.forward

    def spills(self, step, query, key, value, pages, output):
        forward(self, step, query, key, value, pages, output)
        output[step.num_actual_tokens:] = 0  # as a kernel launched over every row would
        return output

    monkeypatch.setattr(HeadAttention, "forward", spills)
    assert run_tiny().checks.failed == {"padding_rows_untouched"}


@needs_cuda
def test_sync_guard_catches_a_host_sync():
    x = torch.ones(2, device=DEVICE)
    with pytest.raises(RuntimeError, match="(?i)synchroniz"), no_host_sync(DEVICE):
        x.sum().item()


@needs_cuda
def test_harness_fails_a_host_sync_in_the_forward():
    class Syncs(BlockTablePageStore):
        def attend_decode(self, state, q, pages, scale):
            int(state.decode_lengths.max())
            return super().attend_decode(state, q, pages, scale)

    result = run_tiny(Syncs)
    assert result.error is not None and "no_host_sync_in_forward" in result.checks.failed
    assert set(CHECKS_CUDA) <= set(result.checks.items)


def test_padded_rows_always_pad():
    assert [padded_rows(n) for n in (1, 7, 8, 9, 16)] == [11, 11, 11, 19, 19]


def test_compare_bounds_errors_and_fails_nan():
    expect = torch.tensor([1.0, -2.0, 0.0])
    assert compare(expect + 1e-5, expect, atol=2e-5, rtol=0)["pass"]
    worse = compare(expect + torch.tensor([0, 1e-3, 0]), expect, atol=2e-5, rtol=1e-4)
    assert not worse["pass"] and worse["bad"] == 1 and worse["max_abs_err"] == pytest.approx(1e-3, rel=1e-3)
    assert not compare(torch.tensor([1.0, float("nan"), 0.0]), expect, atol=1, rtol=1)["pass"]
    assert not compare(expect[:2], expect, atol=1, rtol=1)["pass"]
    assert not compare_exact(expect.bfloat16(), expect + 1e-3)["pass"]


@pytest.mark.parametrize("choice,device,expect", [
    ("auto", "cpu", [("tiny", "float32"), ("tiny", "bfloat16")]),
    ("auto", "cuda", [(s, t) for s in ("small", "llama") for t in ("bfloat16", "float32", "float16")]),
    ("tiny,small", "cpu", [("tiny", "float32"), ("tiny", "bfloat16"), ("small", "float32"), ("small", "bfloat16")]),
])
def test_gpu_shapes_option(choice, device, expect):
    assert step_cases(choice, torch.device(device)) == expect
    with pytest.raises(ValueError, match="unknown shape 'huge'"):
        step_cases("huge", torch.device(device))
