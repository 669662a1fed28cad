"""The step plan (``headkv_vllm.core.plan``): classification, head lengths of every
layer, decode and prefill rows, against the layout's own length formula."""

import pytest
import torch

from headkv_vllm.core.plan import KeptTable, StepInputs, UnsupportedStep, build_step_plan
from headkv_vllm.method.budgets import Budgets
from headkv_vllm.method.layout import head_lengths

BUDGETS = Budgets(caps=((30, 5, 70), (12, 12, 12), (100, 1, 40), (3, 60, 9)), window=4)


def inputs(rows):
    """rows: (query_len, seq_len, prompt_len) per request."""
    qsl = torch.tensor([0] + [q for q, _, _ in rows]).cumsum(0)
    return StepInputs(query_start_loc=qsl.int(), seq_lens=torch.tensor([s for _, s, _ in rows]),
                      prompt_lens=torch.tensor([p for _, _, p in rows]), num_actual_tokens=int(qsl[-1]))


def test_mixed_step_lengths_match_the_layout_formula():
    # decode, prefill (long), decode of a short prompt, recomputed prefill (prompt 50 + 3 generated), padding
    rows = [(1, 201, 120), (300, 300, 300), (1, 9, 5), (53, 53, 50), (0, 0, 0)]
    plan = build_step_plan(inputs(rows), KeptTable(BUDGETS), block_size=8, device="cpu")
    assert plan.kept.shape == plan.lengths.shape == (4, 5, 3)
    for r, (q, total, prompt) in enumerate(rows[:4]):
        for layer in range(4):
            kept = BUDGETS.kept(prompt)[layer]
            assert plan.kept[layer, r].tolist() == list(kept)
            assert plan.lengths[layer, r].tolist() == head_lengths(kept, prompt, total)
    assert plan.decode_reqs.tolist() == [0, 2] and plan.decode_tokens.tolist() == [0, 301]
    assert [(p.row, p.start, p.prompt_len, p.num_tokens, p.window) for p in plan.prefills] == [
        (1, 1, 300, 300, 4), (3, 302, 50, 53, 4)]
    recomputed = plan.prefills[1]
    assert recomputed.generated == 3
    assert recomputed.max_len == int(plan.lengths[:, 3].max())
    # A 50-token prompt fits layer 1 (caps 12 + window 4 < 50? no: 16 < 50, compressed) ...
    assert recomputed.needs_scores == tuple(bool((plan.kept[l, 3] < 50).any()) for l in range(4))
    assert plan.decode_max_len == int(plan.lengths[:, [0, 2]].max())
    assert plan.max_pages == -(-int(plan.lengths.max()) // 8)


def test_short_prompt_needs_no_scores_and_dummy_rows_are_all_prompt():
    plan = build_step_plan(inputs([(3, 3, 3), (6, 6, 0)]), KeptTable(BUDGETS), block_size=16, device="cpu")
    assert all(not any(p.needs_scores) for p in plan.prefills)
    assert [p.prompt_len for p in plan.prefills] == [3, 6]  # prompt 0 = unknown = the whole step


def test_kept_rows_are_reused_for_the_same_requests():
    table = KeptTable(BUDGETS)
    assert table.rows([120, 5]) is table.rows([120, 5])
    assert torch.equal(table.rows([5, 120])[:, 1], table.rows([120, 5])[:, 0])


def test_partial_prefill_is_refused_with_the_reason():
    with pytest.raises(UnsupportedStep, match="only whole-prompt prefills and 1-token decodes"):
        build_step_plan(inputs([(100, 200, 300)]), KeptTable(BUDGETS), block_size=16, device="cpu")


def test_first_chunk_of_a_prompt_is_refused():
    # computed 0 but fewer tokens than the prompt: a chunk, not a whole-prompt prefill
    with pytest.raises(UnsupportedStep, match="only whole-prompt prefills"):
        build_step_plan(inputs([(100, 100, 300)]), KeptTable(BUDGETS), block_size=16, device="cpu")


def test_contiguous_rows_become_spans():
    plan = build_step_plan(inputs([(1, 201, 120), (1, 9, 5), (300, 300, 300)]), KeptTable(BUDGETS), 16, "cpu")
    assert plan.decode_span == (0, 2) and plan.decode_req_span == (0, 2) and plan.prefill_span == (2, 302)
    plan = build_step_plan(inputs([(1, 201, 120), (300, 300, 300), (1, 9, 5)]), KeptTable(BUDGETS), 16, "cpu")
    assert plan.decode_span is None and plan.decode_req_span is None
    assert plan.decode_tokens.tolist() == [0, 301] and plan.decode_reqs.tolist() == [0, 2]
