"""Head-score files: the reader the engine uses at start-up.

The engine looks for a score file for the served model in the package's score files
(:data:`CONFIG_DIR`, the package ``headkv_vllm.configs``: the repository's top-level
``configs/`` folder, which setup.py installs inside the package); a file anywhere else
is used when the ``scores`` setting names it.

Format (JSON, one object):

    {
      "format": "headkv-scores/1",
      "model": {"name": str, "num_layers": L, "num_query_heads": Hq,
                "num_kv_heads": Hkv, "head_dim": d},
      "probe": "R" | "R2" | "synthetic",
      "kv_aggregation": "sum",             # how query-head scores became KV-head scores
      "query_head_scores": [[float] * Hq] * L,   # optional
      "kv_head_scores": [[float] * Hkv] * L,     # what budgets are computed from
      "trials": int,                 # trials answered correctly, the ones the scores average
      "command": str,                # the command that wrote the file
      "calibration": {               # optional, written by `headkv-vllm calibrate`
        "beta": {"<kv_size>": float, ...},   # beta chosen per KV size
        "window": int                        # optional: the window chosen for the model
      }
    }

A calibration gives the engine its defaults for the settings the user leaves unset:
the window, and the beta of the calibrated KV size nearest (in ratio) to the one
served. Its other keys (the grid, the scores per setting, the prompts, the command)
are provenance.

KV-head aggregation: a KV head's score is the SUM of the scores of the query heads
that share it, so the KV-head scores keep the query-head scores' normalisation
and a group with one strong retrieval head ranks high. (Every group has the same
size, so "mean" would differ by a constant factor and give the same budgets.)

``query_head_scores`` are L1-normalised over all L x Hq heads. When a file has
them, the reader checks that ``kv_head_scores`` is their aggregation. Other keys
(``trials_run``, ``grid``, ``seconds``, ...) are provenance and are not read.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import os
import sys
from pathlib import Path

from headkv_vllm.method.config import MAX_WINDOW, short_repr

FORMAT = "headkv-scores/1"
KV_AGGREGATION = "sum"


def _shipped_config_dir() -> Path:
    """The folder of the package ``headkv_vllm.configs``: ``<site-packages>/headkv_vllm/configs``
    in an installed wheel, the repository's ``configs/`` in an editable install."""
    return Path(os.fspath(importlib.resources.files("headkv_vllm.configs")))


CONFIG_DIR = _shipped_config_dir()


class ScoreFileError(ValueError):
    pass


REGENERATE = " Regenerate the file with `headkv-vllm score-heads` (or `headkv-vllm import-scores`)."


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    name: str
    num_layers: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int


def identity_from_hf_config(text_config, name: str) -> ModelIdentity:
    """A model's identity from its Hugging Face text config (an object with config.json's keys as
    attributes: ``transformers`` config, vLLM's ``hf_text_config``) and the name it is served by."""
    heads = text_config.num_attention_heads
    return ModelIdentity(
        name=name,
        num_layers=text_config.num_hidden_layers,
        num_query_heads=heads,
        num_kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
    )


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Settings ``headkv-vllm calibrate`` chose for the file's model (engine defaults)."""

    betas: tuple[tuple[int, float], ...]  # (kv_size, beta), by KV size
    window: int | None = None


@dataclasses.dataclass(frozen=True)
class HeadScores:
    path: Path
    model: ModelIdentity
    probe: str
    kv_head_scores: tuple[tuple[float, ...], ...]
    query_head_scores: tuple[tuple[float, ...], ...] | None = None
    kv_aggregation: str = KV_AGGREGATION
    trials: int | None = None
    command: str | None = None
    calibration: Calibration | None = None

    def check_model(self, model: ModelIdentity) -> None:
        for key in ("num_layers", "num_query_heads", "num_kv_heads", "head_dim"):
            want, have = getattr(model, key), getattr(self.model, key)
            if want != have:
                raise ScoreFileError(
                    f"{self.path}: key 'model.{key}' is {have} but the served model "
                    f"'{model.name}' has {want}. Use a score file made for this model "
                    f"(`headkv-vllm score-heads`) or the policy 'snapkv' / 'pyramidkv'."
                )


def aggregate_to_kv_heads(
    query_scores: list[list[float]], num_kv_heads: int, how: str = KV_AGGREGATION
) -> list[list[float]]:
    """Sum (or average) the scores of the query heads of each GQA group (query head q -> KV head q // G)."""
    group = len(query_scores[0]) // num_kv_heads
    scale = 1 / group if how == "mean" else 1
    return [[sum(row[k * group : (k + 1) * group]) * scale for k in range(num_kv_heads)] for row in query_scores]


def read_json(path: Path, not_found: str, invalid_fix: str = ""):
    """The JSON in ``path``, or a ScoreFileError naming the file (and the fix)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScoreFileError(f"{path}: {not_found}") from None
    except IsADirectoryError:
        raise ScoreFileError(f"{path}: is a folder, not a file. Name the JSON file itself.") from None
    except OSError as e:
        raise ScoreFileError(f"{path}: cannot be read ({e.strerror}). Fix its permissions or name another file.") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or an integer too long to read
        raise ScoreFileError(f"{path}: not valid JSON ({e}).{invalid_fix}") from None


def load_scores(path: str | Path, calibration: bool = True) -> HeadScores:
    """The score file at ``path``, checked; ``calibration`` False ignores its 'calibration' key."""
    path = Path(path)
    if not path.exists():
        raise ScoreFileError(f"{path}: no such score file. Fix the path. {score_files_note()}")
    data = read_json(path, "no such score file.", REGENERATE)
    if not isinstance(data, dict):
        raise ScoreFileError(f"{path}: must hold one JSON object, got {type(data).__name__}.{REGENERATE}")

    def need(key, kind, where=data, prefix=""):
        if key not in where:
            raise ScoreFileError(f"{path}: key '{prefix}{key}' is missing.{REGENERATE}")
        value = where[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ScoreFileError(f"{path}: key '{prefix}{key}' must be {_kind(kind)}, got {short_repr(value)}.{REGENERATE}")
        return value

    if data.get("format") != FORMAT:
        raise ScoreFileError(f"{path}: key 'format' must be '{FORMAT}', got {short_repr(data.get('format'))}.{REGENERATE}")
    m = need("model", dict)
    model = ModelIdentity(
        name=need("name", str, m, "model."),
        **{k: need(k, int, m, "model.") for k in ("num_layers", "num_query_heads", "num_kv_heads", "head_dim")},
    )
    scores = need("kv_head_scores", list)
    _check_matrix(path, "kv_head_scores", scores, model.num_layers, model.num_kv_heads, "KV heads")
    total = sum(float(s) for row in scores for s in row)
    if not math.isfinite(total):
        raise ScoreFileError(f"{path}: key 'kv_head_scores' sums to {total} (too large to split a budget by).{REGENERATE}")
    if total <= 0:
        raise ScoreFileError(f"{path}: key 'kv_head_scores' sums to 0; no head would get a larger budget.{REGENERATE}")
    query = _read_query_head_scores(path, data, model, scores)
    trials = data.get("trials")
    if trials is not None and (not isinstance(trials, int) or isinstance(trials, bool) or trials < 0):
        raise ScoreFileError(f"{path}: key 'trials' must be a count >= 0, got {short_repr(trials)}.{REGENERATE}")
    return HeadScores(
        path, model, str(data.get("probe", "")), _tuples(scores), query,
        kv_aggregation=data.get("kv_aggregation", KV_AGGREGATION), trials=trials, command=data.get("command"),
        calibration=_read_calibration(path, data.get("calibration")) if calibration else None,
    )


RECALIBRATE = " Run `headkv-vllm calibrate` again, or remove the key 'calibration' (the engine then uses its defaults)."


def _read_calibration(path, cal) -> Calibration | None:
    if cal is None:
        return None
    if not isinstance(cal, dict):
        raise ScoreFileError(f"{path}: key 'calibration' must be an object, got {short_repr(cal)}.{RECALIBRATE}")
    window = cal.get("window")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or not 1 <= window <= MAX_WINDOW):
        raise ScoreFileError(f"{path}: key 'calibration.window' must be an integer 1 to {MAX_WINDOW}, "
                             f"got {short_repr(window)}.{RECALIBRATE}")
    betas = cal.get("beta")
    if not isinstance(betas, dict) or not betas:
        raise ScoreFileError(f"{path}: key 'calibration.beta' must be an object of KV size -> beta, "
                             f"got {short_repr(betas)}.{RECALIBRATE}")
    pairs = []
    for key, beta in betas.items():
        kv_size = int(key) if key.isdigit() else 0
        if kv_size <= (window or 1):
            raise ScoreFileError(f"{path}: key 'calibration.beta' has the KV size {short_repr(key)}; KV sizes are "
                                 f"integers above the window ({window or 1}).{RECALIBRATE}")
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 1 < beta < math.inf:
            raise ScoreFileError(f"{path}: key 'calibration.beta.{key}' must be a finite number > 1, "
                                 f"got {short_repr(beta)}.{RECALIBRATE}")
        pairs.append((kv_size, float(beta)))
    return Calibration(tuple(sorted(pairs)), window)


def _check_matrix(path, key: str, rows, num_layers: int, num_heads: int, what: str) -> None:
    if not isinstance(rows, list) or len(rows) != num_layers or any(
        not isinstance(r, list) or len(r) != num_heads for r in rows
    ):
        raise ScoreFileError(
            f"{path}: key '{key}' must be {num_layers} rows (layers) of {num_heads} numbers ({what}), as 'model' "
            f"declares.{REGENERATE}"
        )
    for layer, row in enumerate(rows):
        for head, s in enumerate(row):
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not (0 <= s <= sys.float_info.max):
                raise ScoreFileError(
                    f"{path}: key '{key}[{layer}][{head}]' must be a finite number >= 0, got {short_repr(s)}.{REGENERATE}")


def _read_query_head_scores(path, data: dict, model: ModelIdentity, kv_scores):
    aggregation = data.get("kv_aggregation", KV_AGGREGATION)
    if aggregation not in ("sum", "mean"):
        raise ScoreFileError(
            f"{path}: key 'kv_aggregation' must be 'sum' (or 'mean'), got {short_repr(aggregation)}.{REGENERATE}")
    if model.num_kv_heads < 1 or model.num_query_heads % model.num_kv_heads:
        raise ScoreFileError(
            f"{path}: key 'model.num_query_heads' ({model.num_query_heads}) must be a multiple of "
            f"'model.num_kv_heads' ({model.num_kv_heads}).{REGENERATE}"
        )
    if "query_head_scores" not in data:
        return None
    query = data["query_head_scores"]
    _check_matrix(path, "query_head_scores", query, model.num_layers, model.num_query_heads, "query heads")
    expected = aggregate_to_kv_heads(query, model.num_kv_heads, aggregation)
    for layer, (want_row, have_row) in enumerate(zip(expected, kv_scores)):
        for head, (want, have) in enumerate(zip(want_row, have_row)):
            if not math.isclose(want, have, rel_tol=1e-6, abs_tol=1e-9):
                raise ScoreFileError(
                    f"{path}: key 'kv_head_scores[{layer}][{head}]' is {have} but the {aggregation} of its query heads' "
                    f"'query_head_scores' is {want}. Regenerate the file with `headkv-vllm score-heads` or "
                    f"`headkv-vllm import-scores`."
                )
    return _tuples(query)


def _kind(kind) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "an integer"}.get(kind, kind.__name__)


def _tuples(rows) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(s) for s in r) for r in rows)


def normalise(scores: list[list[float]]) -> list[list[float]]:
    """L1-normalise over all heads (the method's normalisation)."""
    total = sum(map(sum, scores))
    if not total > 0:
        raise ScoreFileError("every head scored 0: there is nothing to normalise (were any trials kept?).")
    return [[s / total for s in row] for row in scores]


def write_scores(
    path: str | Path,
    model: ModelIdentity,
    probe: str,
    query_head_scores: list[list[float]],
    trials: int,
    command: str,
    **provenance,
) -> Path:
    """Write a score file from raw per-query-head scores (normalised and aggregated here),
    and read it back with :func:`load_scores` so that a file that is written is a file the engine accepts."""
    path = Path(path)
    query = normalise(query_head_scores)
    data = {
        "format": FORMAT,
        "model": dataclasses.asdict(model),
        "probe": probe,
        "kv_aggregation": KV_AGGREGATION,
        "kv_head_scores": aggregate_to_kv_heads(query, model.num_kv_heads),
        "query_head_scores": query,
        "trials": trials,
        "command": command,
        **provenance,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_dump(data) + "\n")
    load_scores(path)
    return path


def _dump(data: dict) -> str:
    """JSON with one matrix row per line: readable, and diffs stay small."""

    def value(v):
        if isinstance(v, list) and v and all(isinstance(r, list) for r in v):
            return "[\n  " + ",\n  ".join(json.dumps(r) for r in v) + "\n ]"
        return json.dumps(v)

    return "{\n" + ",\n".join(f" {json.dumps(k)}: {value(v)}" for k, v in data.items()) + "\n}"


def available_score_files() -> list[str]:
    """Paths of the score files the engine looks through (those in :data:`CONFIG_DIR`)."""
    return sorted(str(p) for p in CONFIG_DIR.glob("*.json"))


def score_files_note() -> str:
    """Where the engine looks for score files and what it finds there (for error messages)."""
    names = [Path(p).name for p in available_score_files()]
    return f"Score files in {CONFIG_DIR}: {', '.join(names) or 'none'}."


def lookup_help() -> str:
    """Where the engine finds score files (for the help of the tools that write one)."""
    return (f"The engine picks a score file for the served model by itself only from the package's score "
            f"files in {CONFIG_DIR} (the repository's configs/ folder in an editable install, so a file written "
            f"to the default output from the repository's root is found); to serve with a file anywhere else, "
            f"""set the HeadKV setting 'scores' to its path (--additional-config '{{"headkv": {{"scores": PATH}}}}').""")


def engine_lookup_note(path: Path) -> str:
    """What the engine does with a score file written to ``path`` (for the tools that write one)."""
    path = Path(path).resolve()
    if path.parent == CONFIG_DIR.resolve():
        return f"the engine finds it by itself for this model ({CONFIG_DIR})"
    return (f"the engine finds score files by itself only in {CONFIG_DIR}; to serve with this one, "
            f"set the HeadKV setting 'scores' to {str(path)!r}")


def find_score_file(model: ModelIdentity, probe: str = "R2", other_probes: bool = True) -> Path | None:
    """The score file in :data:`CONFIG_DIR` made for ``model`` (same shape; same name, an ``org/`` prefix
    aside): one made with ``probe`` if there is one, else (with ``other_probes``) one made with another."""
    matches = []
    for p in sorted(CONFIG_DIR.glob("*.json")):
        try:
            s = load_scores(p)
        except ScoreFileError:
            continue
        if dataclasses.astuple(s.model)[1:] == dataclasses.astuple(model)[1:] and (
            s.model.name.split("/")[-1] == model.name.split("/")[-1]
        ) and (other_probes or s.probe == probe):
            matches.append((s.probe != probe, p))
    return min(matches)[1] if matches else None
