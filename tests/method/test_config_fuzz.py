"""Randomly corrupted HeadKV settings and score files, fed to vLLM's engine start-up
(``EngineArgs.create_engine_config``, which runs before any engine process exists).
Every one must end in one clear error: a single short paragraph that names the key or
the file and says what to do; none may pass, and none may end in another exception.
Two of them also go through ``vllm serve``, which must print that paragraph and no
traceback."""

from __future__ import annotations

import json
import math
import random
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest

from headkv_vllm.engine.plugin import config_error
from headkv_vllm.method.config import MAX_KV_SIZE, MAX_POOL_KERNEL, MAX_WINDOW, PAGE_STORES
from headkv_vllm.method.scores import CONFIG_DIR

SEED = 20261202
NUM_SETTINGS = 40
NUM_SCORE_FILES = 40
FIX = re.compile(r"\b(use|set|remove|rename|raise|lower|pass|regenerate|fix|name)\b", re.IGNORECASE)
SCORES = CONFIG_DIR / "SmolLM2-135M-Instruct_R2.json"


def odd_value(rng: random.Random):
    """A value of a random JSON type (numbers of every size and sign, NaN and infinities)."""
    return rng.choice([
        lambda: None, lambda: rng.choice([True, False]), lambda: rng.choice([math.nan, math.inf, -math.inf]),
        lambda: rng.choice([-1, 1]) * 10 ** rng.randint(0, 40), lambda: rng.uniform(-1e6, 1e6),
        lambda: "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 200))),
        lambda: [rng.randint(0, 9) for _ in range(rng.randint(0, 5))], lambda: {"value": rng.randint(0, 9)},
    ])()


def bad_setting(rng: random.Random, key: str):
    """A value that ``key`` must refuse: an odd value the key's rules reject, or one just
    outside its range."""
    rules = {
        "kv_size": (lambda v: type(v) is int and 8 < v <= MAX_KV_SIZE, [8, 0, -128, MAX_KV_SIZE + 1, 128.0, "128"]),
        "window": (lambda v: type(v) is int and 1 <= v < 128, [0, -1, MAX_WINDOW + 1, 8.5, "8"]),
        "beta": (lambda v: type(v) in (int, float) and 1 < v < math.inf, [1, 1.0, 0.5, -2, math.nan, math.inf, "1.2"]),
        "pool_kernel": (lambda v: type(v) is int and 1 <= v <= MAX_POOL_KERNEL and v % 2,
                        [0, 8, -7, MAX_POOL_KERNEL + 2, 7.0]),
        "policy": (lambda v: v in ("headkv", "snapkv", "pyramidkv"), ["h2o", "SnapKV", "", 1]),
        "page_store": (lambda v: v in PAGE_STORES, ["gpu", "Block-Table", None]),
        "redistribute": (lambda v: type(v) is bool, [0, 1, "yes", None]),
        "scores": (lambda v: False, [None]),  # filled in by the caller: paths that do not work
    }
    good, edges = rules[key]
    while True:
        value = rng.choice(edges) if rng.random() < 0.4 else odd_value(rng)
        if not good(value) and not (key == "scores" and value is None):
            return value


def corrupted_settings(rng: random.Random, tmp_path: Path) -> list[tuple[dict, list[str]]]:
    """(headkv settings, names one of which the error must mention)."""
    keys = ["kv_size", "window", "beta", "pool_kernel", "policy", "page_store", "redistribute"]
    cases = []
    for i in range(NUM_SETTINGS):
        settings = {"policy": rng.choice(["headkv", "snapkv", "pyramidkv"]), "kv_size": 128, "scores": str(SCORES)}
        kind = rng.random()
        if kind < 0.15:  # a misspelt key
            key = rng.choice(keys)
            typo = key[:-1] if rng.random() < 0.5 else key.replace("_", "-") if "_" in key else key + "s"
            settings[typo] = odd_value(rng)
            cases.append((settings, [typo[:20]]))
        elif kind < 0.3:  # a score file path that does not work
            settings["policy"] = "headkv"
            settings["scores"] = rng.choice([str(tmp_path / f"missing-{i}.json"), str(tmp_path), 3.5, ["a"]])
            cases.append((settings, ["scores", str(tmp_path)]))
        else:
            key = rng.choice(keys)
            settings[key] = bad_setting(rng, key)
            cases.append((settings, [key]))
    return cases


def corrupted_score_files(rng: random.Random, tmp_path: Path) -> list[Path]:
    """Files made from the shipped SmolLM2 R2 scores, each broken one way."""
    text = SCORES.read_text()
    base = json.loads(text)

    def mutated(change):
        data = json.loads(text)
        change(data)
        return json.dumps(data)

    def set_cell(value):
        def change(d):
            d["kv_head_scores"][rng.randrange(30)][rng.randrange(3)] = value
        return change

    def drop(path):
        def change(d):
            *parents, last = path
            for p in parents:
                d = d[p]
            del d[last]
        return change

    def set_key(path, value):
        def change(d):
            *parents, last = path
            for p in parents:
                d = d[p]
            d[last] = value
        return change

    required = [("format",), ("model",), ("model", "name"), ("model", "num_layers"), ("model", "num_query_heads"),
                ("model", "num_kv_heads"), ("model", "head_dim"), ("kv_head_scores",)]
    other_models = [{"num_layers": 24, "num_query_heads": 14, "num_kv_heads": 2, "head_dim": 64},
                    {"num_layers": 30, "num_query_heads": 9, "num_kv_heads": 3, "head_dim": 128},
                    {"num_layers": 32, "num_query_heads": 32, "num_kv_heads": 8, "head_dim": 128}]

    def another_model(d):
        shape = rng.choice(other_models)
        d["model"].update(shape, name="Another-Model")
        d["kv_head_scores"] = [[1.0] * shape["num_kv_heads"] for _ in range(shape["num_layers"])]
        d.pop("query_head_scores", None)

    makers = [
        lambda: text[: rng.randrange(1, len(text) - 1)],  # truncated
        lambda: "",
        lambda: bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))).decode("latin-1"),
        lambda: json.dumps(rng.choice([[1, 2], "scores", 7, None])),
        lambda: mutated(drop(rng.choice(required))),
        lambda: mutated(set_key(rng.choice(required), rng.choice([None, [1], 1.5, {"a": 1}, True]))),
        lambda: mutated(set_cell(rng.choice([math.nan, math.inf, -1.0, "0.3", None, [0.1], True]))),
        lambda: mutated(set_key(("kv_head_scores",), base["kv_head_scores"][: rng.randint(0, 29)])),
        lambda: mutated(set_key(("kv_head_scores",), [r + [0.1] for r in base["kv_head_scores"]])),
        lambda: mutated(set_key(("kv_head_scores",), [[0.0] * 3] * 30)),
        lambda: mutated(set_key(("kv_head_scores",), [[1e308] * 3] * 30)),
        lambda: mutated(set_key(("format",), "headkv-scores/2")),
        lambda: mutated(set_key(("trials",), rng.choice([-3, "many", 2.5]))),
        lambda: mutated(set_key(("kv_aggregation",), "max")),
        lambda: mutated(set_cell(0.5)),  # no longer the sum of its query heads
        lambda: mutated(another_model),
        lambda: mutated(set_cell(10**400)),  # an integer no float holds
        lambda: text.replace("[", "[" + "9" * 5000 + ",", 1),  # an integer too long to read
    ]
    files = []
    for i in range(NUM_SCORE_FILES):
        path = tmp_path / f"scores-{i}.json"
        path.write_text(makers[i % len(makers)]() if i < len(makers) else rng.choice(makers)(), encoding="latin-1")
        files.append(path)
    return files


def make_config(model_dir, headkv):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(model_dir), dtype="float32", attention_backend="headkv",
                      additional_config={"headkv": headkv}, max_model_len=2048)
    return args.create_engine_config()


def assert_clear_error(model_dir, headkv: dict, names: list[str]) -> str:
    try:
        make_config(model_dir, headkv)
    except Exception as e:  # noqa: BLE001 - which exception it is, is what is tested
        err = config_error(e)
        assert err is not None, f"{headkv}: not a HeadKV configuration error: {type(e).__name__}: {e}"
    else:
        raise AssertionError(f"{headkv}: accepted")
    msg = str(err)
    assert "\n" not in msg and "Traceback" not in msg and len(msg) < 700, msg
    assert any(n in msg for n in names), (names, msg)
    assert FIX.search(msg), f"no fix in: {msg}"
    return msg


def test_corrupted_settings_end_in_clear_errors(model_dir, tmp_path):
    cases = corrupted_settings(random.Random(SEED), tmp_path)
    messages = {assert_clear_error(model_dir, headkv, names) for headkv, names in cases}
    assert len(cases) >= NUM_SETTINGS and len(messages) > NUM_SETTINGS // 2  # the corruptions differ


def test_corrupted_score_files_end_in_clear_errors(model_dir, tmp_path):
    files = corrupted_score_files(random.Random(SEED), tmp_path)
    messages = {assert_clear_error(model_dir, {"policy": "headkv", "scores": str(f)}, [str(f)]) for f in files}
    assert len(files) >= NUM_SCORE_FILES and len(messages) > NUM_SCORE_FILES // 2


@pytest.mark.slow
@pytest.mark.parametrize("what", ["settings", "score file"])
def test_vllm_serve_prints_the_error_without_a_traceback(model_dir, tmp_path, what):
    if what == "settings":
        headkv, expected = {"policy": "snapkv", "kv_size": 128, "pool_kernel": 8}, "setting 'pool_kernel' must be odd"
    else:
        path = tmp_path / "scores.json"
        path.write_text(SCORES.read_text()[:500])
        headkv, expected = {"scores": str(path)}, f"{path}: not valid JSON"
    cmd = [str(Path(sys.executable).with_name("vllm")), "serve", str(model_dir), "--dtype", "float32",
           "--attention-backend", "headkv", "--additional-config", json.dumps({"headkv": headkv}), "--port", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "EngineCore" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR HeadKV configuration: ") and expected in last, last
