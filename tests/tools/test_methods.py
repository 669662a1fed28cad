"""The methods eval-needle and bench compare: the served model's identity from its
config.json, and each HeadKV method's score file from ``configs/``."""

import json
from pathlib import Path

import pytest

from support.engines import ROOT, SMOL
from headkv_vllm.method.scores import ModelIdentity
from headkv_vllm.tools.common.methods import MethodError, build_methods, model_identity

SMOL_CONFIG = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}


def test_model_identity_from_config_json(tmp_path):
    folder = tmp_path / "SmolLM2-135M-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SMOL_CONFIG))
    assert model_identity(folder) == SMOL
    (folder / "config.json").write_text(json.dumps({**SMOL_CONFIG, "num_key_value_heads": None, "head_dim": 32}))
    assert model_identity(folder) == ModelIdentity(SMOL.name, 30, 9, 9, 32)
    with pytest.raises(MethodError, match="config.json does not exist"):
        model_identity(tmp_path)


def test_headkv_methods_take_the_score_file_of_their_probe(monkeypatch):
    monkeypatch.chdir(ROOT)
    methods = build_methods(["full", "headkv-r", "headkv-r2"], [64], SMOL, {})
    assert [m.headkv and m.headkv["scores"] for m in methods] == [
        None, str(Path("configs/SmolLM2-135M-Instruct_R.json")), str(Path("configs/SmolLM2-135M-Instruct_R2.json"))]
    other = ModelIdentity("Other-LM", 30, 9, 3, 64)
    with pytest.raises(MethodError, match="no 'R' score file for Other-LM in configs/"):
        build_methods(["headkv-r"], [64], other, {})


def test_paper_methods_set_the_paper_settings_over_extra_ones(monkeypatch):
    monkeypatch.chdir(ROOT)
    paper, default = build_methods(["headkv-r2-paper", "headkv-r2"], [128], SMOL, {}, {"window": 32})
    assert paper.headkv == {"policy": "headkv", "window": 8, "beta": 1.01, "kv_size": 128,
                            "scores": str(Path("configs/SmolLM2-135M-Instruct_R2.json"))}
    assert default.headkv["window"] == 32 and "beta" not in default.headkv
    assert paper.label == "HeadKV-R2 (paper settings) @ 128"
