"""Bad HeadKV settings fail while vLLM builds the engine config, before any engine
process starts, with a message naming the file or key and the fix. (vLLM wraps our
HeadKVConfigError in its config ValidationError; both are ValueErrors.)"""

import json

import pytest



def make_config(model_dir, headkv):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(model_dir), dtype="float32", attention_backend="headkv",
                      additional_config={"headkv": headkv}, max_model_len=2048)
    return args.create_engine_config()


def score_file(tmp_path, rows, layers=30, heads=3):
    path = tmp_path / "scores.json"
    path.write_text(json.dumps({
        "format": "headkv-scores/1",
        "model": {"name": "SmolLM2-135M-Instruct", "num_layers": layers, "num_query_heads": 9,
                  "num_kv_heads": heads, "head_dim": 64},
        "probe": "synthetic", "kv_head_scores": rows,
    }))
    return str(path)


@pytest.mark.parametrize("headkv, pattern", [
    ({"policy": "h2o"}, r"'policy' is 'h2o'; use one of headkv, snapkv, pyramidkv"),
    ({"policy": "snapkv", "kv_size": -5}, r"'kv_size' \(-5\) must exceed 'window'"),
    ({"policy": "snapkv", "kv_size": "128"}, r"'kv_size' must be int, got '128'"),
    ({"policy": "snapkv", "kv_sizes": 128}, r"unknown setting\(s\) 'kv_sizes'. Known settings: kv_size, policy"),
    ({"policy": "headkv"}, r"no file in configs/ matches the model 'SmolLM2-135M-Instruct'.*Fix: set 'scores'"),
])
def test_bad_settings(model_dir, headkv, pattern, tmp_path, monkeypatch):
    monkeypatch.setattr("headkv_vllm.method.scores.CONFIG_DIR", tmp_path)  # no score files: the default lookup finds none
    with pytest.raises(ValueError, match=pattern):
        make_config(model_dir, headkv)


def test_score_file_with_wrong_layer_count(model_dir, tmp_path):
    path = score_file(tmp_path, [[1.0, 1.0, 1.0]] * 28, layers=28)
    with pytest.raises(ValueError, match=r"scores.json: key 'model.num_layers' is 28 but the served model"):
        make_config(model_dir, {"scores": path})


def test_score_file_with_missing_heads(model_dir, tmp_path):
    path = score_file(tmp_path, [[1.0, 1.0, 1.0]] * 29 + [[1.0, 1.0]])
    with pytest.raises(ValueError, match=r"scores.json: key 'kv_head_scores' must be 30 rows"):
        make_config(model_dir, {"scores": path})


@pytest.mark.parametrize("bad", [-1.0, "high", None])
def test_score_file_with_bad_values(model_dir, tmp_path, bad):
    rows = [[1.0, 1.0, 1.0]] * 30
    rows[4] = [1.0, bad, 1.0]
    with pytest.raises(ValueError, match=r"key 'kv_head_scores\[4\]\[1\]' must be a finite number >= 0"):
        make_config(model_dir, {"scores": score_file(tmp_path, rows)})


def test_good_settings_apply_engine_options(model_dir, tmp_path):
    config = make_config(model_dir, {"policy": "snapkv", "kv_size": 64})
    assert not config.cache_config.enable_prefix_caching
    # chunked prefill stays as vLLM configured it, with the user's token budget
    from vllm.engine.arg_utils import EngineArgs

    stock = EngineArgs(model=str(model_dir), dtype="float32", max_model_len=2048).create_engine_config()
    assert config.scheduler_config.enable_chunked_prefill == stock.scheduler_config.enable_chunked_prefill
    assert config.scheduler_config.max_num_batched_tokens == stock.scheduler_config.max_num_batched_tokens
    assert config.parallel_config.worker_cls == "headkv_vllm.engine.worker.HeadKVWorker"
