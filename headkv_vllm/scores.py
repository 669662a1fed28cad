"""Head-score files in ``configs/``: the reader the engine uses at start-up.

Format (JSON, one object):

    {
      "format": "headkv-scores/1",
      "model": {"name": str, "num_layers": L, "num_query_heads": Hq,
                "num_kv_heads": Hkv, "head_dim": d},
      "probe": "R" | "R2" | "synthetic",
      "kv_aggregation": "sum",             # how query-head scores became KV-head scores
      "query_head_scores": [[float] * Hq] * L,   # optional
      "kv_head_scores": [[float] * Hkv] * L,     # what budgets are computed from
      "trials": int, "command": str               # provenance
    }

KV-head aggregation: a KV head's score is the SUM of the scores of the query heads
that share it, so the KV-head scores keep the query-head scores' normalisation
and a group with one strong retrieval head ranks high.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

FORMAT = "headkv-scores/1"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ScoreFileError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    name: str
    num_layers: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int


@dataclasses.dataclass(frozen=True)
class HeadScores:
    path: Path
    model: ModelIdentity
    probe: str
    kv_head_scores: tuple[tuple[float, ...], ...]

    def check_model(self, model: ModelIdentity) -> None:
        for key in ("num_layers", "num_query_heads", "num_kv_heads", "head_dim"):
            want, have = getattr(model, key), getattr(self.model, key)
            if want != have:
                raise ScoreFileError(
                    f"{self.path}: key 'model.{key}' is {have} but the served model "
                    f"'{model.name}' has {want}. Use a score file made for this model "
                    f"(`headkv-vllm score-heads`) or the policy 'snapkv' / 'pyramidkv'."
                )


def aggregate_to_kv_heads(query_scores: list[list[float]], num_kv_heads: int) -> list[list[float]]:
    """Sum the scores of the query heads of each GQA group (query head q -> KV head q // G)."""
    group = len(query_scores[0]) // num_kv_heads
    return [[sum(row[k * group : (k + 1) * group]) for k in range(num_kv_heads)] for row in query_scores]


def load_scores(path: str | Path) -> HeadScores:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ScoreFileError(f"{path}: no such score file. Available: {available_score_files()}") from None
    except json.JSONDecodeError as e:
        raise ScoreFileError(f"{path}: not valid JSON ({e}). Regenerate it with `headkv-vllm score-heads`.") from None

    def need(key, kind, where=data, prefix=""):
        if key not in where:
            raise ScoreFileError(f"{path}: key '{prefix}{key}' is missing. Regenerate the file with `headkv-vllm score-heads`.")
        value = where[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ScoreFileError(f"{path}: key '{prefix}{key}' must be {kind.__name__}, got {value!r}.")
        return value

    if data.get("format") != FORMAT:
        raise ScoreFileError(f"{path}: key 'format' must be '{FORMAT}', got {data.get('format')!r}.")
    m = need("model", dict)
    model = ModelIdentity(
        name=need("name", str, m, "model."),
        **{k: need(k, int, m, "model.") for k in ("num_layers", "num_query_heads", "num_kv_heads", "head_dim")},
    )
    scores = need("kv_head_scores", list)
    if len(scores) != model.num_layers or any(not isinstance(r, list) or len(r) != model.num_kv_heads for r in scores):
        raise ScoreFileError(
            f"{path}: key 'kv_head_scores' must be {model.num_layers} rows (layers) of "
            f"{model.num_kv_heads} numbers (KV heads), as 'model' declares."
        )
    for layer, row in enumerate(scores):
        for head, s in enumerate(row):
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s) or s < 0:
                raise ScoreFileError(
                    f"{path}: key 'kv_head_scores[{layer}][{head}]' must be a finite number >= 0, got {s!r}."
                )
    if sum(map(sum, scores)) <= 0:
        raise ScoreFileError(f"{path}: key 'kv_head_scores' sums to 0; no head would get a larger budget.")
    return HeadScores(path, model, str(data.get("probe", "")), tuple(tuple(float(s) for s in r) for r in scores))


def available_score_files() -> list[str]:
    return sorted(str(p) for p in CONFIG_DIR.glob("*.json"))


def find_score_file(model: ModelIdentity, probe: str = "R2") -> Path | None:
    """The score file in ``configs/`` whose model identity matches, preferring ``probe``."""
    matches = []
    for p in sorted(CONFIG_DIR.glob("*.json")):
        try:
            s = load_scores(p)
        except ScoreFileError:
            continue
        if dataclasses.astuple(s.model)[1:] == dataclasses.astuple(model)[1:] and (
            s.model.name.split("/")[-1] == model.name.split("/")[-1]
        ):
            matches.append((s.probe != probe, p))
    return min(matches)[1] if matches else None
