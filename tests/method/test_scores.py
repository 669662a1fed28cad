"""The score-file format: writer, reader validation (errors name the file, the key
and the fix), the KV-head aggregation, and the engine's default file lookup."""

import json
import types

import pytest

from headkv_vllm.method import scores as score_files
from headkv_vllm.method.budgets import headkv_caps
from headkv_vllm.method.config import HeadKVConfig, HeadKVConfigError
from headkv_vllm.engine.settings import resolve_budgets
from headkv_vllm.method.scores import (
    ModelIdentity,
    ScoreFileError,
    aggregate_to_kv_heads,
    find_score_file,
    identity_from_hf_config,
    load_scores,
    write_scores,
)

TINY = ModelIdentity("Tiny-LM", num_layers=2, num_query_heads=4, num_kv_heads=2, head_dim=8)
RAW = [[4.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 0.0]]  # sums to 8


def written(tmp_path, **changes):
    path = write_scores(tmp_path / "tiny.json", TINY, "R2", RAW, trials=5, command="test")
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


def test_writer_normalises_and_aggregates_by_sum(tmp_path):
    s = load_scores(written(tmp_path))
    assert s.query_head_scores == ((0.5, 0.0, 0.125, 0.125), (0.0, 0.0, 0.25, 0.0))
    # query heads 0,1 -> KV head 0 and 2,3 -> KV head 1 (q // group)
    assert s.kv_head_scores == ((0.5, 0.25), (0.0, 0.25))
    assert sum(map(sum, s.kv_head_scores)) == pytest.approx(1.0)
    assert (s.probe, s.trials, s.command, s.kv_aggregation) == ("R2", 5, "test", "sum")


def test_sum_and_mean_aggregation_give_the_same_budgets():
    query = [[0.3, 0.1, 0.0, 0.05], [0.2, 0.2, 0.1, 0.05]]
    by_sum = headkv_caps(aggregate_to_kv_heads(query, 2, "sum"), 128, 8, 1.01)
    by_mean = headkv_caps(aggregate_to_kv_heads(query, 2, "mean"), 128, 8, 1.01)
    assert by_sum == by_mean


def test_writer_refuses_all_zero_scores(tmp_path):
    with pytest.raises(ScoreFileError, match="every head scored 0"):
        write_scores(tmp_path / "zero.json", TINY, "R", [[0.0] * 4] * 2, trials=0, command="test")


@pytest.mark.parametrize("changes, pattern", [
    ({"format": "headkv-scores/0"}, r"tiny.json: key 'format' must be 'headkv-scores/1'"),
    ({"model": {"name": "Tiny-LM"}}, r"tiny.json: key 'model.num_layers' is missing"),
    ({"kv_head_scores": [[0.5, 0.25]]}, r"key 'kv_head_scores' must be 2 rows \(layers\) of 2 numbers"),
    ({"query_head_scores": [[0.5, 0.0, 0.125], [0.0, 0.0, 0.25]]},
     r"key 'query_head_scores' must be 2 rows \(layers\) of 4 numbers \(query heads\)"),
    ({"query_head_scores": [[0.5, 0.0, 0.125, -0.125], [0.0, 0.0, 0.25, 0.0]]},
     r"key 'query_head_scores\[0\]\[3\]' must be a finite number >= 0"),
    ({"kv_head_scores": [[0.25, 0.5], [0.0, 0.25]]},
     r"key 'kv_head_scores\[0\]\[0\]' is 0.25 but the sum of its query heads' 'query_head_scores' is 0.5"),
    ({"kv_aggregation": "max"}, r"key 'kv_aggregation' must be 'sum'"),
    ({"trials": -1}, r"key 'trials' must be a count >= 0"),
])
def test_reader_errors_name_the_key(tmp_path, changes, pattern):
    with pytest.raises(ScoreFileError, match=pattern):
        load_scores(written(tmp_path, **changes))


def test_reader_checks_the_gqa_grouping(tmp_path):
    path = written(tmp_path, model={**TINY.__dict__, "num_kv_heads": 3}, kv_head_scores=[[1, 1, 1], [1, 1, 1]])
    with pytest.raises(ScoreFileError, match=r"'model.num_query_heads' \(4\) must be a multiple of 'model.num_kv_heads' \(3\)"):
        load_scores(path)


def test_mean_aggregation_is_accepted_when_consistent(tmp_path):
    path = written(tmp_path, kv_aggregation="mean", kv_head_scores=[[0.25, 0.125], [0.0, 0.125]])
    assert load_scores(path).kv_head_scores == ((0.25, 0.125), (0.0, 0.125))


def test_files_without_query_scores_still_load(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"format": "headkv-scores/1", "model": TINY.__dict__, "probe": "synthetic",
                                "kv_head_scores": [[1, 2], [3, 4]]}))
    s = load_scores(path)
    assert s.query_head_scores is None and s.kv_head_scores == ((1, 2), (3, 4))


def test_engine_lookup_prefers_r2_and_matches_name_and_shape(tmp_path, monkeypatch):
    monkeypatch.setattr(score_files, "CONFIG_DIR", tmp_path)
    for probe in ("R", "R2"):
        write_scores(tmp_path / f"Tiny-LM_{probe}.json", TINY, probe, RAW, trials=1, command="test")
    other = ModelIdentity("Other-LM", 2, 4, 2, 8)
    write_scores(tmp_path / "Other-LM_R2.json", other, "R2", RAW, trials=1, command="test")
    assert find_score_file(ModelIdentity("org/Tiny-LM", 2, 4, 2, 8)).name == "Tiny-LM_R2.json"
    assert find_score_file(ModelIdentity("Tiny-LM", 2, 4, 2, 8), probe="R").name == "Tiny-LM_R.json"
    assert find_score_file(ModelIdentity("Tiny-LM", 3, 4, 2, 8)) is None
    assert find_score_file(other, probe="R").name == "Other-LM_R2.json"
    assert find_score_file(other, probe="R", other_probes=False) is None
    budgets, origin = resolve_budgets(HeadKVConfig(), TINY)
    assert "Tiny-LM_R2.json (probe R2)" in origin and budgets.num_kv_heads == 2


def test_engine_without_a_matching_file_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(score_files, "CONFIG_DIR", tmp_path)
    with pytest.raises(HeadKVConfigError, match=r"no file in configs/ matches the model 'Tiny-LM'.*Fix: set 'scores'"):
        resolve_budgets(HeadKVConfig(), TINY)


@pytest.mark.parametrize("probe", ["R", "R2"])
def test_committed_smollm2_scores(probe):
    s = load_scores(score_files.CONFIG_DIR / f"SmolLM2-135M-Instruct_{probe}.json")
    assert (s.model.num_layers, s.model.num_query_heads, s.model.num_kv_heads, s.model.head_dim) == (30, 9, 3, 64)
    assert s.probe == probe and s.trials > 0
    assert s.command.startswith(f"headkv-vllm score-heads models/SmolLM2-135M-Instruct --probe {probe} ")
    caps = [c for row in headkv_caps([list(r) for r in s.kv_head_scores], 128, 8, 1.01) for c in row]
    assert max(caps) > 5 * 120 and min(caps) < 10  # visibly non-uniform


def test_engine_default_for_smollm2_is_the_r2_file():
    found = find_score_file(ModelIdentity("SmolLM2-135M-Instruct", 30, 9, 3, 64))
    assert found == score_files.CONFIG_DIR / "SmolLM2-135M-Instruct_R2.json"


def test_identity_from_a_config_without_kv_heads_or_head_dim():
    config = types.SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=32)
    assert identity_from_hf_config(config, "Tiny-LM") == ModelIdentity("Tiny-LM", 2, 4, 4, 8)
