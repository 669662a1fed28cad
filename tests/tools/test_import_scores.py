"""import-scores on a small synthetic file in the published HeadKV format
("layer-head" -> per-trial scores, per query head)."""

import json
import statistics

import pytest

from headkv_vllm.method.budgets import headkv_caps
from headkv_vllm.tools.scoring.import_scores import main as import_scores
from headkv_vllm.method.scores import load_scores

LAYERS, QUERY_HEADS = 3, 4
SHAPE = ["--num-kv-heads", "2", "--head-dim", "16"]


def flat(rows):
    return [x for r in rows for x in r]


def published(tmp_path, name="Tiny-LM_retrieval_reasoning_heads.json", **changes):
    """Trial lists with a few all-zero heads and one strong head, like the real files."""
    data = {}
    for l in range(LAYERS):
        for h in range(QUERY_HEADS):
            data[f"{l}-{h}"] = [0.0] * 5 if (l + h) % 3 == 0 else [0.01 * (l + 1) * (h + 1), 0.0, 0.02, 0.01, 0.005]
    data["1-2"] = [0.4, 0.5, 0.3, 0.6, 0.2]
    data.update(changes)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path, data


def test_import_normalises_means_and_sums_gqa_groups(tmp_path, capsys):
    src, data = published(tmp_path)
    out = tmp_path / "out.json"
    assert import_scores([str(src), *SHAPE, "--output", str(out)]) == 0
    s = load_scores(out)
    assert (s.model.name, s.probe, s.trials) == ("Tiny-LM", "R2", 5)
    assert (s.model.num_layers, s.model.num_query_heads, s.model.num_kv_heads, s.model.head_dim) == (3, 4, 2, 16)
    means = [[statistics.fmean(data[f"{l}-{h}"]) for h in range(QUERY_HEADS)] for l in range(LAYERS)]
    total = sum(map(sum, means))
    assert flat(s.query_head_scores) == pytest.approx([m / total for row in means for m in row])
    assert flat(s.kv_head_scores) == pytest.approx([x for r in s.query_head_scores for x in (r[0] + r[1], r[2] + r[3])])
    assert s.command.startswith("headkv-vllm import-scores ")
    assert "3 heads score 0" in capsys.readouterr().out  # (0,0), (0,3), (2,1)
    # per query head, the file yields the authors' budgets computed straight from the raw means
    assert headkv_caps([list(r) for r in s.query_head_scores], 128, 8, 1.01) == headkv_caps(means, 128, 8, 1.01)


def test_shape_from_the_model_config(tmp_path):
    src, _ = published(tmp_path, name="Tiny-LM_retrieval_heads.json")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1, "hidden_size": 128}))
    out = tmp_path / "out.json"
    import_scores([str(src), "--config", str(tmp_path / "model"), "--name", "tiny", "--output", str(out)])
    s = load_scores(out)
    assert (s.model.name, s.probe, s.model.num_kv_heads, s.model.head_dim) == ("tiny", "R", 1, 32)
    assert flat(s.kv_head_scores) == pytest.approx([sum(r) for r in s.query_head_scores])


@pytest.mark.parametrize("changes, args, pattern", [
    ({"1_2": [0.1]}, SHAPE, r"key '1_2' is not \"layer-head\""),
    ({"1-2": []}, SHAPE, r"key '1-2' must be a non-empty list of per-trial scores"),
    ({"2-1": "high"}, SHAPE, r"key '2-1' must be a non-empty list"),
    ({"5-0": [0.1]}, SHAPE, r"heads of the 6 x 4 grid are missing, first '3-0'"),
    ({}, ["--num-kv-heads", "3", "--head-dim", "8"], r"4 query heads cannot be grouped over 3 KV heads"),
    ({}, [], r"KV-head count and head_dim of 'Tiny-LM' are not in the score file: pass --config"),
])
def test_import_errors(tmp_path, changes, args, pattern):
    src, _ = published(tmp_path, **changes)
    with pytest.raises(SystemExit, match=pattern):
        import_scores([str(src), "--output", str(tmp_path / "out.json"), *args])


def test_missing_model_config(tmp_path):
    src, _ = published(tmp_path)
    with pytest.raises(SystemExit, match=r"nowhere.json: cannot read the model config"):
        import_scores([str(src), "--config", str(tmp_path / "nowhere.json")])


def test_probe_must_be_given_when_the_name_does_not_tell(tmp_path):
    src, _ = published(tmp_path, name="scores.json")
    with pytest.raises(SystemExit, match="cannot tell the probe from the file name; pass --probe R or --probe R2"):
        import_scores([str(src), *SHAPE, "--output", str(tmp_path / "o.json")])
