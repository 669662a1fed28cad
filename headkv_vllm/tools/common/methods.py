"""The KV-cache methods the evaluation and the benchmark compare, as server settings.

    full        stock vLLM, full KV cache (no HEADKV backend)
    snapkv      HEADKV backend, uniform budgets
    pyramidkv   HEADKV backend, budgets linear in depth
    headkv-r    HEADKV backend, budgets from retrieval-head scores ("R")
    headkv-r2   HEADKV backend, budgets from retrieval-reasoning-head scores ("R2")
    headkv-r-paper, headkv-r2-paper
                the same with the paper's settings (window 8, beta 1.01) set explicitly, so
                that a score file's calibrated defaults (``headkv-vllm calibrate``) do not apply
"""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

from headkv_vllm.method.scores import ModelIdentity, find_score_file, identity_from_hf_config, score_files_note

FULL = "full"
POLICY_OF = {"snapkv": "snapkv", "pyramidkv": "pyramidkv", "headkv-r": "headkv", "headkv-r2": "headkv",
             "headkv-r-paper": "headkv", "headkv-r2-paper": "headkv"}
PROBE_OF = {"headkv-r": "R", "headkv-r2": "R2", "headkv-r-paper": "R", "headkv-r2-paper": "R2"}
PAPER_SETTINGS = {"window": 8, "beta": 1.01}  # HeadKV's published settings (docs/method.md)
METHODS = (FULL, *POLICY_OF)
LABELS = {FULL: "Full cache", "snapkv": "SnapKV", "pyramidkv": "PyramidKV", "headkv-r": "HeadKV-R", "headkv-r2": "HeadKV-R2",
          "headkv-r-paper": "HeadKV-R (paper settings)", "headkv-r2-paper": "HeadKV-R2 (paper settings)"}


class MethodError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    kv_size: int | None  # None for the full cache
    headkv: dict | None  # the --additional-config "headkv" settings; None = stock backend
    # the window (and HeadKV's beta) the server will use: a score file's calibrated ones
    # where ``headkv`` sets none (build_methods fills it in)
    served: dict | None = None

    @property
    def label(self) -> str:
        return LABELS[self.name] if self.kv_size is None else f"{LABELS[self.name]} @ {self.kv_size}"


def parse_names(text: str, option: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise MethodError(f"{option}: unknown method(s) {', '.join(bad) or '(none given)'}; "
                          f"use a comma-separated list of {', '.join(METHODS)}.")
    return names


def parse_ints(text: str, option: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MethodError(f"{option}: {text!r} is not a comma-separated list of integers, e.g. 64,128.") from None
    if not values or min(values) < minimum:
        raise MethodError(f"{option}: give integers >= {minimum}, e.g. 64,128; got {text!r}.")
    return values


def model_identity(model_dir: str | Path) -> ModelIdentity:
    """The served model's shape, read from its config.json (no engine needed)."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise MethodError(f"--model: {path} does not exist; pass a local Hugging Face model folder.")
    return identity_from_hf_config(types.SimpleNamespace(**json.loads(path.read_text())), Path(model_dir).name)


def find_probe_scores(model: ModelIdentity, probe: str) -> Path | None:
    """The shipped score file (``scores.CONFIG_DIR``) for ``model`` made with exactly ``probe`` ("R" or "R2"),
    relative to the working directory when it is below it (as the settings name it)."""
    path = find_score_file(model, probe, other_probes=False)
    if path is None:
        return None
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


def build_methods(names: list[str], kv_sizes: list[int], model: ModelIdentity, score_files: dict[str, str | None],
                  extra_settings: dict | None = None) -> list[Method]:
    """One :class:`Method` per (name, KV size); the full cache once. ``score_files`` maps
    'headkv-r' / 'headkv-r2' to a path, or None to look in the shipped score files."""
    methods = []
    for name in names:
        if name == FULL:
            methods.append(Method(FULL, None, None))
            continue
        settings = {"policy": POLICY_OF[name], **(extra_settings or {})}
        if name.endswith("-paper"):
            settings.update(PAPER_SETTINGS)
        if name in PROBE_OF:
            path = score_files.get(name.removesuffix("-paper")) or find_probe_scores(model, PROBE_OF[name])
            if path is None:
                raise MethodError(
                    f"--methods {name}: no '{PROBE_OF[name]}' score file for {model.name} in configs/. "
                    f"{score_files_note()} "
                    f"Pass --scores-{name.split('-')[1]} FILE (made by `headkv-vllm score-heads`) or leave {name} out.")
            settings["scores"] = str(path)
        methods += [Method(name, k, {**settings, "kv_size": k}, served_settings({**settings, "kv_size": k}, model))
                    for k in kv_sizes]
    return methods


def served_settings(headkv: dict, model: ModelIdentity) -> dict:
    """The window and (policy 'headkv') beta a server with these settings uses, as
    the engine resolves them; a KV size at or under a calibrated window is a MethodError."""
    from headkv_vllm.engine.settings import resolve_budget_rule
    from headkv_vllm.method.config import HeadKVConfig, HeadKVConfigError

    try:
        config = HeadKVConfig.from_mapping(headkv, "--headkv-settings")
        rule, _ = resolve_budget_rule(config, model)
    except HeadKVConfigError as e:
        raise MethodError(str(e)) from None
    served = {"window": rule.window}
    if config.policy == "headkv":
        served["beta"] = rule.beta_for(config.kv_size)
    return served


def recorded_served(run: dict) -> dict | None:
    """A result's served window and beta; results written before they were recorded were
    served the defaults of that time (window 8, beta 1.01) unless their settings said otherwise."""
    if "served" in run or run.get("headkv") is None:
        return run.get("served")
    headkv = run["headkv"]
    served = {"window": headkv.get("window", 8)}
    if headkv.get("policy", "headkv") == "headkv":
        served["beta"] = headkv.get("beta", 1.01)
    return served
