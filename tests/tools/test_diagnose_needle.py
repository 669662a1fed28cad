"""headkv-vllm diagnose-needle: kept sets by the engine's selection code, needle spans
and windows of eval-needle's prompts, retention, argument errors."""

import json
import types

import pytest
import torch

from headkv_vllm.kernels.window_scores import window_scores_ref
from headkv_vllm.tools.diagnose.capture_qk import PromptQK
from headkv_vllm.tools.diagnose.needle import (Config, _config_record, _evaluate, main, parse_args,
                                               reference_layers, summary_text)
from headkv_vllm.tools.diagnose.prompt import build_prompt, token_span, window_info, window_positions
from headkv_vllm.tools.diagnose.select import ReferenceSelection, engine_kept, retention, window_scores
from headkv_vllm.tools.eval.needle_set import NEEDLES


def tiny_qk(n=40, first_row=20, layers=2, hq=4, hkv=2, d=8, seed=0) -> PromptQK:
    g = torch.Generator().manual_seed(seed)
    q = [torch.randn(n - first_row, hq, d, generator=g) for _ in range(layers)]
    k = [torch.randn(n, hkv, d, generator=g) for _ in range(layers)]
    return PromptQK(first_row, q, k, d ** -0.5)


def test_engine_kept_is_top_scores_then_window():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.5]])  # P = 6
    kept = engine_kept(scores, (2 + 3, 20), window=3, n=9)  # head 0: 2 + window; head 1: more than the prompt
    assert kept[0].tolist() == [1, 3, 6, 7, 8]
    assert kept[1].tolist() == list(range(9))


def test_engine_kept_ties_go_to_the_lower_position():
    scores = torch.tensor([[0.5, 0.7, 0.7, 0.7, 0.1]])
    assert engine_kept(scores, (3,), window=1, n=6)[0].tolist() == [1, 2, 5]


def test_engine_kept_keeps_the_template_after_a_user_text_window():
    scores = torch.tensor([[0.0, 1.0, 0.0, 0.0]])  # scored prompt cut at end = 4 + 2
    assert engine_kept(scores, (3,), window=2, n=9)[0].tolist() == [1, 4, 5, 6, 7, 8]


def test_retention_is_the_share_of_answer_tokens_kept():
    kept = torch.tensor([3, 4, 10, 11])
    assert retention(kept, (4, 5)) == 0.5
    assert retention(kept, (10, 11)) == 1.0
    assert retention(kept, (0,)) == 0.0
    with pytest.raises(ValueError, match="empty"):
        retention(kept, ())


def test_window_scores_are_the_kernel_reference_on_the_window_rows():
    qk = tiny_qk()
    got = window_scores(qk, 1, end=35, window=8, pool_kernel=7)
    want = window_scores_ref(qk.q[1][35 - 8 - 20 : 35 - 20], qk.k[1][:35], qk.scale, 7)
    assert got.shape == (2, 27) and torch.equal(got, want)
    with pytest.raises(ValueError, match="not captured"):
        qk.window_queries(0, 10, 18)


@pytest.mark.parametrize("pool_kernel", [1, 7])
@pytest.mark.parametrize("end", [40, 33])
def test_reference_selection_agrees_with_the_engine(pool_kernel, end):
    qk = tiny_qk()
    ref = ReferenceSelection(qk)
    for layer in range(2):
        scores = window_scores(qk, layer, end, 6, pool_kernel)
        for kept in [(9, 14), (6, 40), (7, 7)]:
            mine = engine_kept(scores, kept, 6, 40)
            theirs = ref.kept(layer, end, 6, pool_kernel, kept, 40)
            assert [m.tolist() for m in mine] == [t.tolist() for t in theirs]


def fake_prompt(n=40, answer=(3, 4), question=(30, 31)):
    return types.SimpleNamespace(n=n, answer=answer, question=question, needle=types.SimpleNamespace(name="x"),
                                 length=n, depth=50.0)


def test_evaluate_and_record_means():
    qk = tiny_qk()
    c = Config("snapkv", None, 16, 6, 7, "last")
    scores = [window_scores(qk, layer, 40, 6, 7) for layer in range(2)]
    full = ((40, 40), (40, 40))
    row = _evaluate(fake_prompt(), full, scores, c, 40, None, ())
    assert row["retention"] == [[1.0, 1.0], [1.0, 1.0]] and row["heads_with_needle"] == 4
    window_only = ((6, 6), (6, 6))
    none = _evaluate(fake_prompt(), window_only, scores, c, 40, None, ())
    assert none["mean_retention"] == 0.0 and none["heads_with_needle"] == 0 and none["question_retention"] == 0.0
    assert row["question_retention"] == 1.0
    windows = {"6": {"last": {"text": "w", "template_tokens": 0, "question_tokens": 0}}}
    record = _config_record(c, [row, none], [{"windows": windows}, {"windows": windows}])
    assert record["mean_retention"] == 0.5 and record["heads_with_needle"] == 2 and record["heads"] == 4
    assert record["question_retention"] == 0.5
    assert record["retention"] == [[0.5, 0.5], [0.5, 0.5]] and record["budget"] == [[40, 40], [40, 40]]
    assert record["budget_same_for_all_prompts"] is False and record["reference_equal"] is None
    assert [p["window_text"] for p in record["per_prompt"]] == ["w", "w"]
    assert "| 6 | 0.500 (2) |" in summary_text({"configs": [record]})


def test_reference_layers():
    assert reference_layers("sample", 0, 30) == (0, 15, 29)
    assert reference_layers("sample", 1, 30) == ()
    assert reference_layers("all", 3, 4) == (0, 1, 2, 3)
    assert reference_layers("off", 0, 30) == ()


def test_token_span_overlaps():
    offsets = [(0, 0), (0, 5), (5, 11), (11, 12), (12, 20)]  # a zero-width special token first
    assert token_span(offsets, 6, 12) == (2, 3)
    assert token_span(offsets, 0, 1) == (1,)


@pytest.fixture(scope="module")
def needle_prompts(tokenizer):
    from headkv_vllm.tools.eval.needle_prompts import NeedlePrompts

    return NeedlePrompts(tokenizer)


@pytest.mark.parametrize("needle", NEEDLES, ids=[n.name for n in NEEDLES])
def test_needle_spans_with_the_real_tokenizer(needle, needle_prompts, tokenizer):
    p = build_prompt(needle_prompts, needle, 300, 50)
    decode = lambda positions: tokenizer.decode([p.ids[i] for i in positions]).strip()
    assert decode(p.answer) == needle.answer
    assert decode(p.needle_tokens) == needle.text
    assert decode(p.question) == needle.question
    assert p.question[0] > p.needle_tokens[-1]  # the question after the document
    assert tokenizer.decode(list(p.ids[: p.user_end])).endswith("Answer in one short sentence.")
    tail = tokenizer.decode(list(p.ids[p.user_end :]))
    assert tail.startswith("<|im_end|>") and tail.endswith(needle.answer_prefix or "assistant\n")


def test_window_text(needle_prompts, tokenizer):
    p = build_prompt(needle_prompts, NEEDLES[0], 300, 50)
    last = window_info(tokenizer, p, 8, "last")
    assert last["text"].endswith("<|im_end|>\n<|im_start|>assistant\n") and last["template_tokens"] == 6
    assert last["question_tokens"] == 0
    user = window_info(tokenizer, p, 16, "user-text")
    assert user["text"].endswith("named?\nAnswer in one short sentence.") and user["template_tokens"] == 0
    assert user["question_tokens"] == len(p.question) and window_positions(p, 16, "user-text").stop == p.user_end


@pytest.mark.parametrize("argv, message", [
    (["--methods", "headkv-r3"], "--methods: unknown value(s) headkv-r3"),
    (["--pool-kernels", "7,4"], "--pool-kernels: kernels must be odd"),
    (["--windows", "8,128"], "--windows: every window must be below every KV size"),
    (["--betas", "1.0"], "--betas: HeadKV's beta must be > 1"),
    (["--betas", "1.2,x"], "--betas: '1.2,x' is not a comma-separated list of numbers"),
    (["--heatmap-betas", "3"], "--heatmap-betas: 3 not in --betas"),
    (["--window-ends", "first"], "--window-ends: unknown value(s) first"),
    (["--needles", "haystack"], "--needles: unknown needle(s) haystack"),
    (["--lengths", "10"], "--lengths: give integers >= 64"),
    (["--depths", "150"], "--depths: percentages must be within 0..100"),
    (["--reference", "some"], "--reference: invalid choice"),
])
def test_parse_args_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_parse_args_defaults():
    args = parse_args([])
    assert [n.name for n in args.needle_list] == ["ship-name", "village-jam", "museum-violin", "vault-code",
                                                  "instrument-by-year"]
    assert (args.window_list, args.pool_list, args.kv_size_list) == ([8, 16, 32, 64], [7, 1], [128])
    assert args.window_end_list == ["last", "user-text"] and args.beta_list == [1.01, 1.2, 1.5, 2.0]


def test_missing_model_is_an_error(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "--model:" in capsys.readouterr().err


@pytest.mark.slow
def test_real_run_on_a_short_prompt(model_dir, tmp_path):
    out = tmp_path / "diag"
    assert main(["--model", str(model_dir), "--needles", "ship-name", "--lengths", "300", "--windows", "8,16",
                 "--pool-kernels", "7", "--betas", "1.01", "--methods", "headkv-r2,snapkv", "--reference", "all",
                 "--out", str(out)]) == 0
    result = json.loads((out / "diagnosis.json").read_text())
    assert result["reference"]["used"] and len(result["configs"]) == 2 * 2 * 2
    for c in result["configs"]:
        assert c["reference_equal"] is True and c["reference_compared_heads"] == 30 * 3
        assert 0 <= c["mean_retention"] <= 1 and len(c["retention"]) == 30 and len(c["retention"][0]) == 3
    snap = next(c for c in result["configs"] if c["method"] == "snapkv" and c["window"] == 8)
    assert {b for row in snap["budget"] for b in row} == {128}
    assert result["prompts"][0]["windows"]["8"]["last"]["text"].endswith("assistant\n")
    assert {p.name for p in out.glob("*.png")} == {"summary.png", "heatmap_headkv-r2_beta1.01_last.png",
                                                   "heatmap_headkv-r2_beta1.01_user-text.png",
                                                   "heatmap_snapkv_last.png", "heatmap_snapkv_user-text.png"}


def test_budgets_use_the_swept_window_and_beta_over_a_calibration(tmp_path):
    from headkv_vllm.method.budgets import headkv_caps
    from headkv_vllm.method.scores import load_scores
    from headkv_vllm.tools.diagnose.needle import budget_rules
    from headkv_vllm.tools.common.methods import find_probe_scores

    from support.engines import SMOL

    shipped = find_probe_scores(SMOL, "R2")
    data = json.loads(shipped.read_text())
    data["calibration"] = {"beta": {"128": 3.0}, "window": 32}
    calibrated = tmp_path / shipped.name
    calibrated.write_text(json.dumps(data))
    c = Config("headkv-r2", 1.2, 128, 16, 7, "last")
    budgets = budget_rules([c], {"headkv-r2": str(calibrated)}, SMOL)[c]
    scores = [list(r) for r in load_scores(calibrated).kv_head_scores]
    assert budgets.window == 16 and [list(r) for r in budgets.caps] == headkv_caps(scores, 128, 16, 1.2)
