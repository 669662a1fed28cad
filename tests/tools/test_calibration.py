"""Calibrated settings: the score file's 'calibration' key, how the engine takes it as
its default (and lets explicit settings win), and the calibrate command's choice,
record and prompts (no server here)."""

import json
import shutil
from pathlib import Path

import pytest

from headkv_vllm.engine.settings import resolve_budget_rule
from headkv_vllm.method.budgets import BudgetRule
from headkv_vllm.method.config import HeadKVConfig, HeadKVConfigError
from headkv_vllm.method.scores import ScoreFileError, load_scores
from headkv_vllm.tools.scoring import calibrate
from headkv_vllm.tools.common.plots import calibration_plot
from headkv_vllm.tools.eval.needle_set import NEEDLES

ROOT = Path(__file__).resolve().parents[2]
R2 = ROOT / "configs" / "SmolLM2-135M-Instruct_R2.json"
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"


def _calibrated(tmp_path, calibration) -> Path:
    """The shipped R2 scores with ``calibration`` (None: without one)."""
    data = json.loads(R2.read_text())
    data.pop("calibration", None)
    if calibration is not None:
        data["calibration"] = calibration
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(data))
    return path


def test_calibration_read_sorted(tmp_path):
    cal = load_scores(_calibrated(tmp_path, {"beta": {"256": 1.01, "64": 1.5}, "window": 32})).calibration
    assert cal.betas == ((64, 1.5), (256, 1.01)) and cal.window == 32
    assert load_scores(_calibrated(tmp_path, None)).calibration is None
    shipped = load_scores(R2).calibration  # configs/ ships the choice of `calibrate` (README)
    assert shipped.window == 16 and shipped.betas == ((64, 1.5), (128, 1.5), (256, 1.5))


@pytest.mark.parametrize("calibration, key", [
    ([1.2], "'calibration' must be an object"),
    ({"beta": {}}, "'calibration.beta' must be an object"),
    ({"beta": {"128": 1.0}}, r"'calibration.beta.128' must be a finite number > 1"),
    ({"beta": {"128": True}}, r"'calibration.beta.128' must be a finite number > 1"),
    ({"beta": {"big": 1.2}}, "KV size 'big'"),
    ({"beta": {"16": 1.2}, "window": 32}, "KV size '16'; KV sizes are integers above the window \\(32\\)"),
    ({"beta": {"128": 1.2}, "window": 0}, "'calibration.window' must be an integer 1 to"),
])
def test_bad_calibration_named(tmp_path, calibration, key):
    with pytest.raises(ScoreFileError, match=key) as e:
        load_scores(_calibrated(tmp_path, calibration))
    assert "headkv-vllm calibrate" in str(e.value) and "scores.json" in str(e.value)


def test_beta_of_the_nearest_calibrated_size():
    rule = BudgetRule("headkv", 128, 8, 1.01, True, 2, 2, ((0.4, 0.1), (0.3, 0.2)),
                      betas=((64, 1.5), (128, 1.2), (512, 1.01)))
    assert [rule.beta_for(k) for k in (16, 64, 90, 91, 128, 256, 257, 4096)] == \
        [1.5, 1.5, 1.5, 1.2, 1.2, 1.2, 1.01, 1.01]  # 90.5 is the geometric midpoint of 64 and 128
    # exact ties (the geometric midpoint) go to the smaller size, whatever floats say
    tie = BudgetRule("headkv", 128, 8, 1.01, True, 2, 2, ((0.4, 0.1), (0.3, 0.2)), betas=((72, 1.5), (128, 1.2)))
    assert tie.beta_for(96) == 1.5 and tie.beta_for(97) == 1.2
    plain = BudgetRule("headkv", 128, 8, 1.01, True, 2, 2, ((0.4, 0.1), (0.3, 0.2)))
    assert plain.beta_for(64) == 1.01
    assert rule.budgets(64) == BudgetRule("headkv", 64, 8, 1.5, True, 2, 2, rule.scores).budgets()
    assert rule.budgets(64) != plain.budgets(64)


def test_engine_takes_the_calibration_unless_set(tmp_path):
    path = _calibrated(tmp_path, {"beta": {"64": 1.5, "128": 1.2}, "window": 16})
    model = load_scores(R2).model
    rule, origin = resolve_budget_rule(HeadKVConfig.from_mapping({"scores": str(path)}), model)
    assert (rule.window, rule.beta_for(128), rule.beta_for(64)) == (16, 1.2, 1.5)
    assert "calibrated window 16 and beta per KV size 64: 1.5, 128: 1.2" in origin
    rule, origin = resolve_budget_rule(HeadKVConfig.from_mapping({"scores": str(path), "window": 8, "beta": 1.01}), model)
    assert (rule.window, rule.beta_for(64)) == (8, 1.01) and "calibration overridden" in origin
    rule, _ = resolve_budget_rule(HeadKVConfig.from_mapping({"scores": str(path), "beta": 2.0}), model)
    assert (rule.window, rule.beta_for(64)) == (16, 2.0)
    # betas chosen at window 16 do not carry over to another window
    rule, _ = resolve_budget_rule(HeadKVConfig.from_mapping({"scores": str(path), "window": 8}), model)
    assert (rule.window, rule.beta_for(64)) == (8, 1.01)
    rule, _ = resolve_budget_rule(HeadKVConfig.from_mapping({"scores": str(path), "window": 16}), model)
    assert rule.beta_for(64) == 1.5
    with pytest.raises(HeadKVConfigError, match=r"'kv_size' \(12\) must exceed the window 16 calibrated in .*"
                                                r"'calibration.window'"):
        resolve_budget_rule(HeadKVConfig.from_mapping({"scores": str(path), "kv_size": 12}), model)
    # other policies have no score file, so no calibration
    rule, _ = resolve_budget_rule(HeadKVConfig.from_mapping({"policy": "snapkv"}), model)
    assert rule.window == 8


def test_choice_window_then_beta_ties_to_the_first_listed():
    table = {
        "window 8, beta 1.01": {"64": 10.0, "128": 30.0},
        "window 8, beta 1.5": {"64": 20.0, "128": 30.0},
        "window 32, beta 1.01": {"64": 25.0, "128": 20.0},
        "window 32, beta 1.5": {"64": 5.0, "128": 20.0},
    }
    # window 8: best 20 and 30 (mean 25); window 32: 25 and 20 (mean 22.5)
    assert calibrate.choose(table, [8, 32], [1.01, 1.5], [64, 128]) == {"window": 8, "beta": {"64": 1.5, "128": 1.01}}
    table["window 32, beta 1.01"]["128"] = 25.0  # now a tie at 25: the first listed window
    assert calibrate.choose(table, [8, 32], [1.01, 1.5], [64, 128])["window"] == 8
    assert calibrate.choose(table, [32, 8], [1.01, 1.5], [64, 128])["window"] == 32
    assert calibrate.choose(table, [32], [1.01, 1.5], [64, 128]) == {"window": 32, "beta": {"64": 1.01, "128": 1.01}}


def _result(tmp_path) -> dict:
    runs = {}
    for window in (8, 32):
        for beta in (1.01, 2.0):
            runs[calibrate.grid_key(window, beta)] = {"window": window, "beta": beta,
                                                      "mean_rouge1": {"64": window + beta, "128": 40 - beta}}
    result = {"model": "SmolLM2-135M-Instruct", "scores": "s.json", "probe": "R2", "kv_sizes": [64, 128],
              "windows": [8, 32], "betas": [1.01, 2.0], "runs": runs, "command": "headkv-vllm calibrate ...",
              "machine": {"git_commit": "abc"},
              "prompts": {"needles": [{"name": n.name} for n in calibrate.CALIBRATION_NEEDLES], "lengths": [1000]}}
    result["table"] = {k: r["mean_rouge1"] for k, r in runs.items()}
    result["chosen"] = calibrate.choose(result["table"], [8, 32], [1.01, 2.0], [64, 128])
    return result


def test_record_in_the_score_file_and_report(tmp_path):
    path = tmp_path / "scores.json"
    shutil.copy(R2, path)
    result = _result(tmp_path)
    assert result["chosen"] == {"window": 32, "beta": {"64": 2.0, "128": 1.01}}
    calibrate.write_calibration(path, result["chosen"], result, tmp_path / "calibration.json")
    data = json.loads(path.read_text())
    assert data["kv_head_scores"] == json.loads(R2.read_text())["kv_head_scores"]
    assert data["calibration"]["command"] == "headkv-vllm calibrate ..."
    assert data["calibration"]["prompts"]["needles"][0] == "lighthouse-keeper"
    cal = load_scores(path).calibration
    assert cal.window == 32 and cal.betas == ((64, 2.0), (128, 1.01))
    table = calibrate.summary_table(result)
    assert "| 32 | 2 | **34.0** | 38.0 |" in table and "Chosen (bold): window 32; beta KV 64: 2, KV 128: 1.01" in table
    assert calibration_plot(result, tmp_path / "c.png").stat().st_size > 1000


def test_calibration_prompts_share_nothing_with_the_evaluations():
    names = {n.name for n in calibrate.CALIBRATION_NEEDLES}
    texts = {n.text for n in calibrate.CALIBRATION_NEEDLES}
    assert not names & {n.name for n in NEEDLES} and not texts & {n.text for n in NEEDLES}
    from headkv_vllm.tools.scoring.probes import NEEDLES as PROBE_NEEDLES

    assert not texts & {n.text for needles in PROBE_NEEDLES.values() for n in needles}
    from transformers import AutoTokenizer

    from headkv_vllm.tools.eval.needle_prompts import NeedlePrompts

    prompts = NeedlePrompts(AutoTokenizer.from_pretrained(MODEL))
    half = len(prompts.haystack) // 2
    assert half > 8000  # eval-needle's longest document (from token 0) ends before the calibration's start
    chat = prompts.build(calibrate.CALIBRATION_NEEDLES[0], 1000, 50, offset=half)
    assert "Tobias Wren" in chat[0]["content"]
    with pytest.raises(ValueError, match="exceed the haystack"):
        prompts.build(calibrate.CALIBRATION_NEEDLES[0], 1000, 50, offset=len(prompts.haystack) - 10)


@pytest.mark.parametrize("argv, message", [
    (["--scores", str(R2), "--betas", "1.0,1.2"], "every beta must be > 1"),
    (["--scores", str(R2), "--betas", "x"], "not a comma-separated list of numbers"),
    (["--scores", str(R2), "--kv-sizes", "32", "--windows", "8,32"], "must exceed every window"),
    (["--scores", "missing.json"], "--scores: missing.json is not a file"),
    (["--scores", str(R2), "--depths", "0,150"], "within 0..100"),
])
def test_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit):
        calibrate.parse_args(argv + ["--out", "x"])
    assert message in capsys.readouterr().err


def test_calibrate_replaces_a_broken_calibration_atomically(tmp_path):
    path = _calibrated(tmp_path, {"beta": {"128": 0.5}})
    with pytest.raises(ScoreFileError):
        load_scores(path)
    assert load_scores(path, calibration=False).calibration is None  # what calibrate reads
    result = _result(tmp_path)
    calibrate.write_calibration(path, result["chosen"], result, tmp_path / "calibration.json")
    assert load_scores(path).calibration.window == 32
    bad = {"window": 32, "beta": {"16": 1.2}}  # refused by the reader: the file stays as it was
    before = path.read_text()
    with pytest.raises(ScoreFileError):
        calibrate.write_calibration(path, bad, result, tmp_path / "calibration.json")
    assert path.read_text() == before


def test_budgets_tool_serves_the_calibration_unless_given(tmp_path, capsys):
    from headkv_vllm.tools.scoring import budget_table

    path = _calibrated(tmp_path, {"beta": {"128": 2.0}, "window": 16})
    budget_table.main([str(path), "--json"])
    t = json.loads(capsys.readouterr().out)
    assert (t["window"], t["beta"]) == (16, 2.0)
    budget_table.main([str(path), "--json", "--window", "8", "--beta", "1.01"])
    t = json.loads(capsys.readouterr().out)
    assert (t["window"], t["beta"]) == (8, 1.01)
    budget_table.main([str(path), "--json", "--per", "query-head"])
    assert json.loads(capsys.readouterr().out)["window"] == 16


def test_eval_methods_record_what_is_served(tmp_path, monkeypatch):
    from support.engines import SMOL
    from headkv_vllm.tools.common.methods import MethodError, build_methods, recorded_served

    path = _calibrated(tmp_path, {"beta": {"128": 2.0}, "window": 16})
    r2, paper, snap = build_methods(["headkv-r2", "headkv-r2-paper", "snapkv"], [128], SMOL, {"headkv-r2": str(path)})
    assert r2.served == {"window": 16, "beta": 2.0}
    assert paper.headkv["scores"] == str(path) and paper.served == {"window": 8, "beta": 1.01}
    assert snap.served == {"window": 8}
    # results written before 'served' was recorded ran at the defaults of that time
    assert recorded_served({"headkv": {"policy": "headkv", "kv_size": 128}}) == {"window": 8, "beta": 1.01}
    assert recorded_served({"headkv": {"policy": "snapkv", "window": 32}}) == {"window": 32}
    assert recorded_served({"headkv": None}) is None
    with pytest.raises(MethodError, match="must exceed the window 16 calibrated"):
        build_methods(["headkv-r2"], [12], SMOL, {"headkv-r2": str(path)})
