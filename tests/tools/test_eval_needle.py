"""``headkv-vllm eval-needle``: prompts, scoring and options (fast), and a small run
through real servers, stock and HEADKV (slow)."""

import json
import subprocess
import sys

import pytest

from support.engines import ROOT
from headkv_vllm.tools.eval.needle import FORMAT, earlier_cells, parse_args, summarize, summary_table
from headkv_vllm.tools.eval.needle_set import NEEDLES
from headkv_vllm.tools.common.needle import rouge1_recall
from headkv_vllm.tools.eval.needle_prompts import chat_options, contains_answer, score

REASONING = next(n for n in NEEDLES if n.kind == "reasoning")


def test_needles_are_unique_and_answerable_from_their_text():
    assert len({n.name for n in NEEDLES}) == len(NEEDLES)
    assert {n.kind for n in NEEDLES} == {"retrieval", "reasoning"}
    for n in NEEDLES:
        assert n.answer in n.text and (n.distractor is None or n.distractor in n.text)


def test_needles_differ_from_the_head_scoring_probes():
    probes = pytest.importorskip("headkv_vllm.tools.scoring.probes")
    probe_texts = {p.text for needles in probes.NEEDLES.values() for p in needles}
    probe_answers = {p.answer.lower() for needles in probes.NEEDLES.values() for p in needles}
    for n in NEEDLES:
        assert n.text not in probe_texts and n.answer.lower() not in probe_answers


def test_scoring_containment_and_rouge1_recall():
    ship = NEEDLES[0]
    assert score("The ship is named the Silver Heron.", ship) == {"contains": True, "rouge1": 1.0}
    assert score("It is called the silver   heron", ship)["contains"]
    assert score("The Silver Swan.", ship) == {"contains": False, "rouge1": 0.5}
    assert rouge1_recall("heron heron", "silver heron") == 0.5
    assert rouge1_recall("anything", "") == 0.0


def test_a_reasoning_answer_naming_the_distractor_too_gets_no_credit():
    assert contains_answer(f" {REASONING.answer}.", REASONING)
    assert score(f"{REASONING.answer} or {REASONING.distractor}", REASONING) == {"contains": False, "rouge1": 0.0}
    assert score(f"{REASONING.distractor}", REASONING)["rouge1"] == 0.0


@pytest.fixture(scope="module")
def prompts(model_dir):
    from transformers import AutoTokenizer

    from headkv_vllm.tools.eval.needle_prompts import NeedlePrompts

    return NeedlePrompts(AutoTokenizer.from_pretrained(str(model_dir)))


@pytest.mark.parametrize("length", [300, 1000, 4000])
@pytest.mark.parametrize("depth", [0.0, 50.0, 100.0])
@pytest.mark.parametrize("needle", [NEEDLES[0], REASONING], ids=lambda n: n.name)
def test_prompt_has_the_length_and_the_needle_at_the_depth(prompts, needle, length, depth):
    chat = prompts.build(needle, length, depth)
    ids = prompts.tokenizer.apply_chat_template(chat, tokenize=True, **chat_options(needle))
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert abs(len(ids) - length) <= 3
    document = chat[0]["content"].split("Document:\n", 1)[1].rsplit("\n\nQuestion:", 1)[0]
    at = document.index(needle.text) / max(1, len(document) - len(needle.text))
    assert abs(100 * at - depth) <= 12  # moved back to a sentence end
    assert chat[-1]["role"] == ("assistant" if needle.answer_prefix else "user")


def test_too_short_length_names_the_option(prompts):
    with pytest.raises(ValueError, match="--lengths"):
        prompts.build(NEEDLES[0], 40, 50)


@pytest.mark.parametrize("argv, message", [
    (["--methods", "full,h2o"], "--methods: unknown method"),
    (["--kv-sizes", "64,x"], "--kv-sizes"),
    (["--needles", "nope"], "--needles: unknown needle"),
    (["--depths", "0,150"], "--depths"),
    (["--headkv-settings", "{beta"], "--headkv-settings"),
    (["--base-url", "http://x", "--methods", "snapkv", "--kv-sizes", "64,128"], "--base-url"),
])
def test_bad_options_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_summary_is_relative_to_the_full_cache():
    cell = lambda length, ok: {"length": length, "rouge1": float(ok), "contains": ok}
    runs = [
        {"method": "full", "kv_size": None, "label": "Full cache", "cells": [cell(1000, True), cell(4000, True)]},
        {"method": "snapkv", "kv_size": 64, "label": "SnapKV @ 64", "cells": [cell(1000, True), cell(4000, False)]},
    ]
    rows = {r["method"]: r for r in summarize(runs, (1000, 3000))}
    assert rows["snapkv"]["rouge1_pct_of_full"] == 50.0 and rows["snapkv"]["rouge1_range_pct_of_full"] == 100.0
    assert "ROUGE-1 recall, 1000-3000 tokens" in summary_table(list(rows.values()), (1000, 3000))
    assert "ROUGE-1 recall, 4000 tokens" in summary_table(summarize(runs, (4000, 4000)), (4000, 4000))


@pytest.mark.slow
def test_small_run_through_real_servers(model_dir, tmp_path):
    out = tmp_path / "needle"
    cmd = [sys.executable, "-m", "headkv_vllm.cli", "eval-needle", "--model", str(model_dir),
           "--methods", "full,snapkv", "--kv-sizes", "32", "--lengths", "600,1200", "--depths", "0,100",
           "--needles", f"{NEEDLES[0].name},{REASONING.name}", "--kv-cache-bytes", str(2**30), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "needle.json").read_text())
    assert [(r["method"], r["kv_size"]) for r in result["runs"]] == [("full", None), ("snapkv", 32)]
    full, snap = result["runs"]
    assert len(full["cells"]) == len(snap["cells"]) == 8
    assert all(abs(c["prompt_tokens"] - c["length"]) <= 3 for c in full["cells"])
    assert sum(c["contains"] for c in full["cells"]) >= 6, [c["response"] for c in full["cells"]]
    assert snap["server"]["headkv_pool"]["kv_size"] == 32 and full["server"]["headkv_pool"] is None
    assert result["summary"][1]["rouge1_pct_of_full"] is not None
    assert (out / "heatmap_full.png").stat().st_size > 0 and (out / "heatmap_snapkv.png").stat().st_size > 0
    assert "| SnapKV | 32 |" in (out / "summary.md").read_text()
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --resume widens the grid: only the cells at the new depth are asked, on one new server.
    cmd[cmd.index("--depths") + 1] = "0,50,100"
    cmd[cmd.index("--methods") + 1] = "full"
    proc = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    widened = json.loads((out / "needle.json").read_text())["runs"][0]
    assert len(widened["cells"]) == 12 and widened["wall_s"] > full["wall_s"]
    assert [c for c in widened["cells"] if c["depth"] != 50.0] == full["cells"]
    assert "12/12" not in proc.stderr and "4/4" in proc.stderr


def test_resume_keeps_cells_of_the_same_model_answer_length_and_needle_text(tmp_path):
    needles = [n.as_dict() for n in (NEEDLES[0], REASONING)]
    row = lambda needle, length: {"needle": needle["name"], "length": length, "depth": 0.0, "contains": True}
    run = {"method": "snapkv", "kv_size": 64, "headkv": {"policy": "snapkv", "kv_size": 64},
           "cells": [row(n, length) for n in needles for length in (500, 1000)]}
    earlier = {"format": FORMAT, "model": "m", "grid": {"max_tokens": 32}, "needles": needles, "runs": [run]}
    path = tmp_path / "needle.json"
    path.write_text(json.dumps(earlier))
    changed = {**needles[1], "answer": "violin"}
    now = {"model": "m", "grid": {"max_tokens": 32}, "needles": [needles[0], changed]}
    kept_run, rows = earlier_cells(path, now)[("snapkv", 64)]
    assert kept_run == run and sorted(rows) == [(NEEDLES[0].name, 500, 0.0), (NEEDLES[0].name, 1000, 0.0)]
    assert earlier_cells(path, {**now, "grid": {"max_tokens": 64}}) == {}
    assert earlier_cells(path, {**now, "model": "other"}) == {}
    assert earlier_cells(tmp_path / "absent.json", now) == {}


def test_summary_plot_has_a_line_per_method(tmp_path):
    from headkv_vllm.tools.common.plots import needle_summary_plot

    cell = lambda ok: {"length": 2000, "rouge1": float(ok), "contains": ok}
    runs = [{"method": "full", "kv_size": None, "label": "Full cache", "cells": [cell(True)]}]
    runs += [{"method": m, "kv_size": kv, "label": f"{m} @ {kv}", "cells": [cell(kv > 32)]}
             for m in ("snapkv", "headkv-r") for kv in (32, 128)]
    result = {"model": "m", "summary": summarize(runs, (1000, 3000))}
    png = needle_summary_plot(result, (1000, 3000), tmp_path / "summary.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
