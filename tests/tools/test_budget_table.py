"""headkv-vllm budgets: the table comes from the engine's allocation code."""

import json

import pytest

from headkv_vllm.tools.scoring.budget_table import main as budgets_cli
from headkv_vllm.method.budgets import headkv_caps
from headkv_vllm.method.config import HeadKVConfig
from headkv_vllm.engine.settings import resolve_budgets
from headkv_vllm.method.scores import ModelIdentity, load_scores, write_scores

MODEL = ModelIdentity("Tiny-LM", num_layers=3, num_query_heads=4, num_kv_heads=2, head_dim=16)
RAW = [[9.0, 0.0, 0.5, 0.5], [0.0, 0.1, 3.0, 0.0], [0.2, 0.2, 0.2, 6.0]]


@pytest.fixture
def score_file(tmp_path):
    return write_scores(tmp_path / "Tiny-LM_R2.json", MODEL, "R2", RAW, trials=3, command="test")


def run(capsys, *args):
    assert budgets_cli([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    return json.loads(out) if "--json" in args else out


def test_per_kv_head_is_what_the_engine_resolves(score_file, capsys):
    t = run(capsys, score_file, "--kv-size", 64, "--beta", 1.2, "--json")
    config = HeadKVConfig(kv_size=64, beta=1.2, scores=str(score_file))
    engine_caps = resolve_budgets(config, MODEL)[0].caps
    assert t["heads"] == [list(r) for r in engine_caps]
    flat = [c for r in t["heads"] for c in r]
    assert (t["min"], t["max"], t["mean"]) == (min(flat), max(flat), round(sum(flat) / len(flat), 3))
    assert [s["max"] for s in t["per_layer"]] == [max(r) for r in t["heads"]]
    assert t["per"] == "kv-head" and len(t["heads"][0]) == 2


def test_per_query_head_is_the_authors_formula_on_query_scores(score_file, capsys):
    t = run(capsys, score_file, "--per", "query-head", "--json")
    query = [list(r) for r in load_scores(score_file).query_head_scores]
    assert t["heads"] == headkv_caps(query, 128, 8, 1.01)
    assert abs(t["mean"] - 120) < 1 and t["min"] == 120 - 118  # min_num = b - floor(b / beta)


def test_text_table(score_file, capsys):
    out = run(capsys, score_file, "--per", "query-head")
    t = run(capsys, score_file, "--per", "query-head", "--json")
    assert f"min {t['min']}  max {t['max']}  mean {t['mean']:.1f}" in out
    assert "per query head, redistribution on" in out and len(out.splitlines()) == 6 + 3


def test_short_prompt_with_and_without_redistribution(score_file, capsys):
    on = run(capsys, score_file, "--prompt-len", 300, "--json")
    off = run(capsys, score_file, "--prompt-len", 300, "--no-redistribute", "--json")
    assert on["max"] == off["max"] == 300 - 8
    assert on["mean"] == pytest.approx(120, abs=0.5)  # the excess went to other heads
    assert off["mean"] < 119  # the excess was dropped
    caps = run(capsys, score_file, "--json")
    assert off["heads"] == [[min(c, 292) for c in r] for r in caps["heads"]]


def test_other_policies(score_file, capsys):
    snap = run(capsys, score_file, "--policy", "snapkv", "--per", "query-head", "--json")
    assert snap["min"] == snap["max"] == 120 and len(snap["heads"][0]) == 4
    pyramid = run(capsys, score_file, "--policy", "pyramidkv", "--json")
    assert pyramid["per_layer"][0]["min"] > pyramid["per_layer"][-1]["max"]


def test_png_heatmap(score_file, tmp_path, capsys):
    png = tmp_path / "heat" / "budgets.png"
    run(capsys, score_file, "--png", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_name_the_file_and_the_fix(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": "headkv-scores/1", "model": MODEL.__dict__, "probe": "synthetic",
                               "kv_head_scores": [[1, 2], [3, 4], [5, 6]]}))
    with pytest.raises(SystemExit, match=r"old.json: key 'query_head_scores' is missing.*Use --per kv-head"):
        budgets_cli([str(old), "--per", "query-head"])
    with pytest.raises(SystemExit, match=r"setting 'beta' must be a finite number > 1"):
        budgets_cli([str(old), "--beta", "0.9"])
    with pytest.raises(SystemExit, match=r"missing.json: no such score file"):
        budgets_cli([str(tmp_path / "missing.json")])
