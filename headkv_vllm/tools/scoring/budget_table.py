"""``headkv-vllm budgets``: the per-head budget table a score file yields.

Per KV head the table comes from ``engine.settings.resolve_budgets``, the call the
engine makes at start-up; per query head it is the same allocation
(``budgets.policy_budgets``) applied to the file's query-head scores, which is
what the authors' code serves. The numbers are prefix tokens chosen per head
(docs/method.md section 2: ``cap``, window not included); with
``--prompt-len`` they are what a prompt of that length keeps, with the excess of
caps above the prompt given to other heads or not (``--no-redistribute``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from headkv_vllm.method.budgets import POLICIES, Budgets, policy_budgets
from headkv_vllm.method.config import HeadKVConfig, HeadKVConfigError
from headkv_vllm.engine.settings import resolve_budget_rule, resolve_budgets, served_config
from headkv_vllm.method.scores import HeadScores, ScoreFileError, load_scores

PER = ("kv-head", "query-head")


def table_budgets(scores: HeadScores, config: HeadKVConfig, per: str) -> Budgets:
    if per == "kv-head":
        return resolve_budgets(config, scores.model)[0]
    if config.policy == "headkv" and scores.query_head_scores is None:
        raise ScoreFileError(
            f"{scores.path}: key 'query_head_scores' is missing, so there is no per-query-head table. "
            f"Use --per kv-head, or rewrite the file with `headkv-vllm score-heads` / `import-scores`."
        )
    return policy_budgets(config, scores.model.num_layers, scores.model.num_query_heads, scores.query_head_scores)


def prefix_tokens(budgets: Budgets, prompt_len: int | None) -> list[list[int]]:
    """Prefix tokens each head keeps: its cap for a long prompt, else what ``prompt_len`` allows."""
    if prompt_len is None:
        return [list(r) for r in budgets.caps]
    return [[max(0, k - budgets.window) for k in row] for row in budgets.kept(prompt_len)]


def stats(values: list[int]) -> dict:
    return {"min": min(values), "max": max(values), "mean": round(sum(values) / len(values), 3)}


def table(scores: HeadScores, config: HeadKVConfig, per: str, prompt_len: int | None) -> dict:
    heads = prefix_tokens(table_budgets(scores, config, per), prompt_len)
    flat = [c for row in heads for c in row]
    return {
        "file": str(scores.path),
        "model": scores.model.name,
        "probe": scores.probe,
        "policy": config.policy,
        "kv_size": config.kv_size,
        "window": config.window,
        "beta": config.beta,
        "per": per,
        "redistribute": config.redistribute,
        "prompt_len": prompt_len,
        "quantity": "prefix tokens per head (window not included)",
        **stats(flat),
        "mean_kept": round(sum(flat) / len(flat) + config.window, 3) if prompt_len is None
        else round(sum(min(c + config.window, prompt_len) for c in flat) / len(flat), 3),
        "per_layer": [{"layer": l, **stats(row)} for l, row in enumerate(heads)],
        "heads": heads,
    }


def format_table(t: dict, scores: HeadScores) -> str:
    m = scores.model
    head_kind = "KV head" if t["per"] == "kv-head" else "query head"
    source = "a long prompt" if t["prompt_len"] is None else f"a {t['prompt_len']}-token prompt"
    lines = [
        f"{t['file']}: {m.name}, probe {t['probe'] or '?'}, {m.num_layers} layers, "
        f"{m.num_query_heads} query heads, {m.num_kv_heads} KV heads",
        f"policy {t['policy']}, KV size {t['kv_size']}, window {t['window']}, beta {t['beta']}, per {head_kind}, "
        f"redistribution {'on' if t['redistribute'] else 'off'}",
        f"prefix tokens per {head_kind} from {source} (window not included):",
        f"  min {t['min']}  max {t['max']}  mean {t['mean']:.1f}   (mean kept with window: {t['mean_kept']:.1f})",
        "",
        "layer    min    max    mean" + ("   heads" if len(t["heads"][0]) <= 16 else ""),
    ]
    for row, s in zip(t["heads"], t["per_layer"]):
        cells = " ".join(f"{c:5d}" for c in row) if len(row) <= 16 else ""
        lines.append(f"{s['layer']:5d} {s['min']:6d} {s['max']:6d} {s['mean']:7.1f}   {cells}".rstrip())
    if len(t["heads"][0]) > 16:
        lines.append("(--json lists every head)")
    return "\n".join(lines)


def write_heatmap(t: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    heads = t["heads"]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(heads[0]) + 2), max(4, 0.22 * len(heads) + 1.5)))
    image = ax.imshow(heads, aspect="auto", cmap="viridis", norm=LogNorm(vmin=max(1, t["min"]), vmax=max(2, t["max"])))
    ax.set_xticks(range(0, len(heads[0]), max(1, len(heads[0]) // 16)))
    ax.set_xlabel("KV head" if t["per"] == "kv-head" else "query head")
    ax.set_ylabel("layer")
    ax.set_title(f"{t['model']} {t['probe']}: {t['policy']} KV size {t['kv_size']}, beta {t['beta']}\n"
                 f"prefix tokens per head: min {t['min']}, mean {t['mean']:.0f}, max {t['max']}", fontsize=9)
    fig.colorbar(image, ax=ax, label="prefix tokens (log scale)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="headkv-vllm budgets",
        description="Print the per-head token budgets a score file yields for a policy, KV size and "
        "beta: min / max / mean overall and per layer, computed by the engine's own allocation code.",
    )
    p.add_argument("scores", type=Path, help="score file (configs/*.json, or one written by import-scores)")
    p.add_argument("--policy", choices=POLICIES, default="headkv")
    p.add_argument("--kv-size", type=int, default=128, help="average tokens kept per head, window included (default 128)")
    p.add_argument("--beta", type=float, help="HeadKV pool factor > 1 (default: the file's calibrated beta, else 1.01)")
    p.add_argument("--window", type=int, help="observation window (default: the file's calibrated window, else 8)")
    p.add_argument("--per", choices=PER, default="kv-head",
                   help="kv-head: what the engine stores (default); query-head: the authors' per-query-head budgets")
    p.add_argument("--prompt-len", type=int, help="show what a prompt of this many tokens keeps (default: caps)")
    p.add_argument("--no-redistribute", dest="redistribute", action="store_false",
                   help="with --prompt-len: drop the excess of caps above the prompt instead of giving it to other heads")
    p.add_argument("--json", action="store_true", help="print JSON (min, max, mean at top level, per_layer, heads)")
    p.add_argument("--png", type=Path, help="also write a layer x head heatmap to this PNG file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))
    try:
        scores = load_scores(args.scores)
        given = {"kv_size": args.kv_size, "policy": args.policy, "scores": str(args.scores), "beta": args.beta,
                 "window": args.window, "redistribute": args.redistribute}
        config = HeadKVConfig.from_mapping({k: v for k, v in given.items() if v is not None}, "headkv-vllm budgets")
        # the window and beta the engine would serve (a calibration's, unless given), in both --per modes
        config = served_config(config, resolve_budget_rule(config, scores.model)[0])
        t = table(scores, config, args.per, args.prompt_len)
    except (ScoreFileError, HeadKVConfigError) as e:
        raise SystemExit(f"budgets: {e}") from None
    if args.png:
        write_heatmap(t, args.png)
    print(json.dumps(t) if args.json else format_table(t, scores))
    return 0
