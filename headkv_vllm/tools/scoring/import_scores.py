"""``headkv-vllm import-scores``: convert a published HeadKV score file into the engine's score-file format.

The published files (HeadKV's repository, one per model and probe) are JSON dicts
"layer-head" -> list of per-trial scores, per QUERY head. A head's score is the
mean of its list; the scores are L1-normalised and summed over each GQA group
into KV-head scores (``scores.py`` documents the aggregation). The files say
nothing about KV heads or head_dim: they come from ``--config`` (the model's
config.json), from ``--num-kv-heads``/``--head-dim``, or for the two published
models from the table below.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
from pathlib import Path

from headkv_vllm.method.scores import (ModelIdentity, ScoreFileError, engine_lookup_note, lookup_help, read_json,
                                       write_scores)

# num_kv_heads, head_dim of the models the authors published scores for (their config.json)
KNOWN_SHAPES = {"Meta-Llama-3-8B-Instruct": (8, 128), "Mistral-7B-Instruct-v0.2": (8, 128)}
KEY = re.compile(r"^(\d+)-(\d+)$")


def read_published(path: Path) -> tuple[list[list[float]], int]:
    """Per-query-head mean scores ``[layer][head]`` and the number of trials per head."""
    data = read_json(path, "no such file.")
    if not isinstance(data, dict) or not data:
        raise ScoreFileError(f"{path}: expected a JSON object of \"layer-head\" -> list of per-trial scores.")
    heads = {}
    for key, values in data.items():
        match = KEY.match(key)
        if not match:
            raise ScoreFileError(f"{path}: key {key!r} is not \"layer-head\" (e.g. \"0-0\", \"31-31\").")
        if not isinstance(values, list) or not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values
        ):
            raise ScoreFileError(f"{path}: key {key!r} must be a non-empty list of per-trial scores >= 0.")
        heads[int(match[1]), int(match[2])] = values
    num_layers = 1 + max(l for l, _ in heads)
    num_heads = 1 + max(h for _, h in heads)
    missing = [f"{l}-{h}" for l in range(num_layers) for h in range(num_heads) if (l, h) not in heads]
    if missing:
        raise ScoreFileError(
            f"{path}: {len(missing)} heads of the {num_layers} x {num_heads} grid are missing, "
            f"first {missing[0]!r}. The file must have a key for every layer and query head."
        )
    scores = [[statistics.fmean(heads[l, h]) for h in range(num_heads)] for l in range(num_layers)]
    return scores, max(map(len, heads.values()))


def guess_name_and_probe(path: Path) -> tuple[str, str | None]:
    """``Meta-Llama-3-8B-Instruct_retrieval_reasoning_heads.json`` -> (name, "R2")."""
    stem = path.name.removesuffix(".json")
    name, _, kind = stem.partition("_retrieval")
    probe = {"_reasoning_heads": "R2", "_heads": "R"}.get(kind)
    return name, probe


def model_shape(args, name: str, num_layers: int, num_heads: int) -> tuple[int, int]:
    if args.config:
        path = args.config / "config.json" if args.config.is_dir() else args.config
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ScoreFileError(f"{path}: cannot read the model config ({e}); pass the model's config.json.") from None
        config = config.get("text_config", config)
        for key, have in (("num_hidden_layers", num_layers), ("num_attention_heads", num_heads)):
            if config.get(key) != have:
                raise ScoreFileError(f"{path}: '{key}' is {config.get(key)} but the score file has {have}.")
        kv = config.get("num_key_value_heads") or num_heads
        return kv, config.get("head_dim") or config["hidden_size"] // num_heads
    if args.num_kv_heads and args.head_dim:
        return args.num_kv_heads, args.head_dim
    if name in KNOWN_SHAPES:
        return KNOWN_SHAPES[name]
    raise ScoreFileError(
        f"the KV-head count and head_dim of {name!r} are not in the score file: pass --config "
        f"<model folder or config.json>, or --num-kv-heads and --head-dim."
    )


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="headkv-vllm import-scores",
        description="Convert a published HeadKV score file (JSON \"layer-head\" -> per-trial scores, per "
        "query head) into a score file the engine reads, with per-query-head scores and their "
        "KV-head aggregation (sum over each GQA group). " + lookup_help(),
    )
    p.add_argument("source", type=Path, help="published score file, e.g. Meta-Llama-3-8B-Instruct_retrieval_reasoning_heads.json")
    p.add_argument("--output", type=Path, help="file to write (default: configs/<name>_<probe>.json under the "
                   "current directory)")
    p.add_argument("--name", help="model name the engine matches (the served model's folder or repo name; "
                   "default: from the file name)")
    p.add_argument("--probe", choices=("R", "R2"), help="default: from the file name (retrieval_reasoning -> R2)")
    p.add_argument("--config", type=Path, help="the model's config.json (or its folder): KV heads and head_dim")
    p.add_argument("--num-kv-heads", type=int, help="KV heads, if no --config")
    p.add_argument("--head-dim", type=int, help="head_dim, if no --config")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    args = parse_args(argv)
    try:
        scores, trials = read_published(args.source)
        name, probe = guess_name_and_probe(args.source)
        name, probe = args.name or name, args.probe or probe
        if probe is None:
            raise ScoreFileError(f"{args.source}: cannot tell the probe from the file name; pass --probe R or --probe R2.")
        num_kv_heads, head_dim = model_shape(args, name, len(scores), len(scores[0]))
        if len(scores[0]) % num_kv_heads:
            raise ScoreFileError(f"{len(scores[0])} query heads cannot be grouped over {num_kv_heads} KV heads.")
        model = ModelIdentity(name, len(scores), len(scores[0]), num_kv_heads, head_dim)
        output = args.output or Path("configs") / f"{name}_{probe}.json"
        write_scores(
            output, model, probe, scores, trials=trials,
            command="headkv-vllm import-scores " + shlex.join(argv), source=args.source.name,
        )
    except ScoreFileError as e:
        raise SystemExit(f"import-scores: {e}") from None
    zero = sum(s == 0 for row in scores for s in row)
    print(f"{name} ({probe}): {model.num_layers} layers x {model.num_query_heads} query heads -> "
          f"{num_kv_heads} KV heads, {trials} trials per head, {zero} heads score 0; wrote {output}; "
          f"{engine_lookup_note(output)}")
    return 0
