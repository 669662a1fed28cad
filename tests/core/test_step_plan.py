"""The step plan (``headkv_vllm.core.plan``): classification, head lengths of every
layer, decode and prefill rows, against the layout's own length formula."""

import pytest
import torch

from headkv_vllm.core.plan import KeptTable, StepInputs, build_step_plan
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
    assert plan.layout.kept.shape == plan.layout.lengths.shape == (4, 5, 3)
    for r, (q, total, prompt) in enumerate(rows[:4]):
        for layer in range(4):
            kept = BUDGETS.kept(prompt)[layer]
            assert plan.layout.kept[layer, r].tolist() == list(kept)
            assert plan.layout.lengths[layer, r].tolist() == head_lengths(kept, prompt, total)
    assert plan.decode.reqs.tolist() == [0, 2] and plan.decode.tokens.tolist() == [0, 301]
    assert [(p.row, p.start, p.prompt_len, p.num_tokens, p.window) for p in plan.prefills] == [
        (1, 1, 300, 300, 4), (3, 302, 50, 53, 4)]
    recomputed = plan.prefills[1]
    assert recomputed.generated == 3
    assert recomputed.max_len == int(plan.layout.lengths[:, 3].max())
    # A 50-token prompt fits layer 1 (caps 12 + window 4 < 50? no: 16 < 50, compressed) ...
    assert recomputed.needs_scores == tuple(bool((plan.layout.kept[l, 3] < 50).any()) for l in range(4))
    assert plan.decode.max_len == int(plan.layout.lengths[:, [0, 2]].max())
    assert plan.layout.max_pages == -(-int(plan.layout.lengths.max()) // 8)


def test_short_prompt_needs_no_scores_and_dummy_rows_are_all_prompt():
    plan = build_step_plan(inputs([(3, 3, 3), (6, 6, 0)]), KeptTable(BUDGETS), block_size=16, device="cpu")
    assert all(not any(p.needs_scores) for p in plan.prefills)
    assert [p.prompt_len for p in plan.prefills] == [3, 6]  # prompt 0 = unknown = the whole step


def test_kept_rows_are_reused_for_the_same_requests():
    table = KeptTable(BUDGETS)
    assert table.rows([120, 5]) is table.rows([120, 5])
    assert torch.equal(table.rows([5, 120])[:, 1], table.rows([120, 5])[:, 0])


def test_chunks_are_planned_by_kind():
    # first chunk, middle chunk, last chunk, generated tokens of a recomputed request (prompt 50)
    rows = [(100, 100, 300), (100, 200, 300), (130, 330, 300), (5, 58, 50)]
    plan = build_step_plan(inputs(rows), KeptTable(BUDGETS), block_size=16, device="cpu")
    first, middle, last, generated = plan.prefills
    assert [(p.computed, p.context, p.prompt_queries, p.new_generated) for p in plan.prefills] == [
        (0, 0, 100, 0), (100, 100, 100, 0), (200, 200, 100, 30), (53, 50, 0, 5)]
    assert [p.compresses for p in plan.prefills] == [False, False, True, False]
    # uncompressed while chunked: every head holds every token
    assert (plan.layout.lengths[:, 0] == 100).all() and (plan.layout.lengths[:, 1] == 200).all()
    for layer in range(4):
        assert plan.layout.lengths[layer, 2].tolist() == head_lengths(BUDGETS.kept(300)[layer], 300, 330)
    # prompt attention: queries are the step's prompt rows, keys the prompt so far
    assert plan.prompts.cu_seqlens_q.tolist() == [0, 100, 200, 300]
    assert plan.prompts.cu_seqlens_k.tolist() == [0, 100, 300, 600]
    assert plan.prompts.has_context and plan.prompts.max_len_k == 300
    assert plan.prompts.tokens.tolist() == list(range(300))  # the last chunk's 30 generated rows are not prompt
    assert plan.prompts.span == (0, 300)
    assert BUDGETS.window == 4 and last.saved_window == 0 and middle.saved_window == 0


def test_window_queries_of_earlier_chunks_are_counted():
    # prompt 300, window 4: a chunk ending at 298 computed two window queries
    plan = build_step_plan(inputs([(2, 300, 300)]), KeptTable(BUDGETS), block_size=16, device="cpu")
    assert plan.prefills[0].saved_window == 2 and plan.prefills[0].compresses


def counts(plan_rows, offsets_by_layer, block_size=16):
    """Row entries the scheduler would hold: the layout's pages plus leading nulls."""
    plan = build_step_plan(inputs(plan_rows), KeptTable(BUDGETS), block_size, "cpu")
    need = ((plan.layout.lengths_host.long() + block_size - 1) // block_size).sum(2)
    return need + torch.tensor(offsets_by_layer)


def test_row_offsets_of_chunked_prompts_are_found_and_checked():
    rows = [(130, 330, 300), (1, 9, 5)]
    bs = 16
    full = 3 * -(-300 // bs)
    compressed = [sum(-(-k // bs) for k in BUDGETS.kept(300)[layer]) for layer in range(4)]
    gap = [[full - c, 0] for c in compressed]
    plan = build_step_plan(StepInputs(**{**inputs(rows).__dict__, "row_counts": counts(rows, gap)}),
                           KeptTable(BUDGETS), bs, "cpu")
    assert plan.layout.has_offsets and plan.layout.offsets_host.tolist() == gap
    # a one-step prompt has no leading nulls
    plan = build_step_plan(StepInputs(**{**inputs(rows).__dict__, "row_counts": counts(rows, [[0, 0]] * 4)}),
                           KeptTable(BUDGETS), bs, "cpu")
    assert not plan.layout.has_offsets
    # anything else is a disagreement with the scheduler
    with pytest.raises(RuntimeError, match="scheduler allocated"):
        build_step_plan(StepInputs(**{**inputs(rows).__dict__, "row_counts": counts(rows, [[1, 0]] * 4)}),
                        KeptTable(BUDGETS), bs, "cpu")
    # an uncompressed chunk holds exactly every head's pages
    with pytest.raises(RuntimeError, match="scheduler allocated"):
        build_step_plan(StepInputs(**{**inputs([(100, 100, 300)]).__dict__,
                                      "row_counts": counts([(100, 100, 300)], [[3]] * 4)}), KeptTable(BUDGETS), bs, "cpu")


def test_contiguous_rows_become_spans():
    plan = build_step_plan(inputs([(1, 201, 120), (1, 9, 5), (300, 300, 300)]), KeptTable(BUDGETS), 16, "cpu")
    assert plan.decode.span == (0, 2) and plan.decode.req_span == (0, 2) and plan.prompts.span == (2, 302)
    plan = build_step_plan(inputs([(1, 201, 120), (300, 300, 300), (1, 9, 5)]), KeptTable(BUDGETS), 16, "cpu")
    assert plan.decode.span is None and plan.decode.req_span is None
    assert plan.decode.tokens.tolist() == [0, 301] and plan.decode.reqs.tolist() == [0, 2]
