"""``headkv-vllm eval-needle``: needle-in-a-haystack quality of each KV-cache method,
measured through the OpenAI API of a real ``vllm serve``.

For each method (full cache = stock vLLM; SnapKV, PyramidKV, HeadKV-R, HeadKV-R2 at
each KV size) one server is started, every grid cell (needle x context length x
depth) is sent at once, greedy, and the answers are scored by exact containment and
ROUGE-1 recall against the needle's answer. Writes ``needle.json``, a heatmap PNG
per method (depth x length, one panel per KV size), ``summary.md`` and ``summary.png``
(score against KV size per method).

    headkv-vllm eval-needle --model models/SmolLM2-135M-Instruct \\
        --methods full,headkv-r2,headkv-r,snapkv,pyramidkv --kv-sizes 64,128 \\
        --lengths 1000,2000,3000 --depths 0,50,100 --out results/needle

``--base-url`` evaluates a server that is already running instead (one method).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from headkv_vllm.tools.eval.needle_set import NEEDLES, Needle
from headkv_vllm.tools.eval.runs import (Ask, add_method_options, ask_method, check_method_options, earlier_rows,
                                        methods_of, run_methods, table_order)
from headkv_vllm.tools.common.methods import FULL, Method, MethodError, parse_ints
from headkv_vllm.tools.common.plots import length_span

FORMAT = "headkv-eval-needle/1"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="headkv-vllm eval-needle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_method_options(p)
    p.add_argument("--lengths", default="500,1000,1500,2000,2500,3000,3500,4000", help="context lengths in tokens")
    p.add_argument("--depths", default="0,25,50,75,100", help="needle depths in percent of the document")
    p.add_argument("--needles", default="all", help="'all' or comma-separated needle names: "
                   + ", ".join(n.name for n in NEEDLES))
    p.add_argument("--summary-lengths", default="1000:3000", help="MIN:MAX context lengths of the headline column")
    p.add_argument("--max-tokens", type=int, default=32, help="answer length limit")
    p.add_argument("--resume", action="store_true", help="keep finished cells from an earlier needle.json in --out; run only the missing ones")
    p.add_argument("--out", default="results/needle", help="output folder")
    args = p.parse_args(argv)
    check_method_options(p, args)
    try:
        args.length_list = parse_ints(args.lengths, "--lengths", minimum=64)
        args.depth_list = [float(d) for d in parse_ints(args.depths, "--depths", minimum=0)]
        args.needle_list = select_needles(args.needles)
        lo, _, hi = args.summary_lengths.partition(":")
        args.summary_range = (int(lo), int(hi))
    except ValueError as e:
        p.error(str(e) if isinstance(e, MethodError) else f"--summary-lengths: use MIN:MAX, e.g. 1000:3000 ({e}).")
    if max(args.depth_list) > 100:
        p.error("--depths: percentages must be within 0..100.")
    return args


def select_needles(text: str) -> list[Needle]:
    if text == "all":
        return list(NEEDLES)
    by_name = {n.name: n for n in NEEDLES}
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in by_name]
    if bad or not names:
        raise MethodError(f"--needles: unknown needle(s) {', '.join(bad) or '(none)'}; use 'all' or some of "
                          f"{', '.join(by_name)}.")
    return [by_name[n] for n in names]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        methods = methods_of(args)
    except MethodError as e:
        print(f"headkv-vllm eval-needle: error: {e}", file=sys.stderr)
        return 2
    command = "headkv-vllm eval-needle " + shlex.join(argv)
    return run_eval(args, methods, command)


def run_eval(args: argparse.Namespace, methods: list[Method], command: str) -> int:
    from transformers import AutoTokenizer

    from headkv_vllm.tools.common.machine import machine_info
    from headkv_vllm.tools.eval.needle_prompts import NeedlePrompts
    from headkv_vllm.tools.common.serve_process import stop_servers_on_sigterm

    stop_servers_on_sigterm()

    prompts = NeedlePrompts(AutoTokenizer.from_pretrained(args.model))
    cells = [(n, length, depth) for n in args.needle_list for length in args.length_list for depth in args.depth_list]
    try:
        chats = [prompts.build(n, length, depth) for n, length, depth in cells]
    except ValueError as e:
        print(f"headkv-vllm eval-needle: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "needle.json"
    grid = {"needles": [n.name for n in args.needle_list], "lengths": args.length_list, "depths": args.depth_list,
            "max_tokens": args.max_tokens}
    result = {"format": FORMAT, "command": command, "machine": machine_info(), "model": Path(args.model).name,
              "grid": grid, "needles": [n.as_dict() for n in args.needle_list], "runs": []}
    earlier = earlier_cells(json_path, result) if args.resume else {}
    keys = [cell_key(n.name, length, depth) for n, length, depth in cells]

    def evaluate(method: Method, todo: list[int]) -> dict:
        return _evaluate(method, [cells[i] for i in todo], [chats[i] for i in todo], args, out)

    def save(runs: list[dict]) -> None:
        result["runs"] = runs
        result["summary"] = summarize(runs, args.summary_range)
        json_path.write_text(json.dumps(result, indent=1))

    run_methods(methods, keys, earlier, "cells", _row_key, evaluate, save)
    table = summary_table(result["summary"], args.summary_range)
    (out / "summary.md").write_text(table + "\n")
    from headkv_vllm.tools.common.plots import needle_heatmaps, needle_summary_plot

    pngs = needle_heatmaps(result, out) + [needle_summary_plot(result, args.summary_range, out / "summary.png")]
    print(table)
    print(f"wrote {json_path}, {out / 'summary.md'}, " + ", ".join(str(p) for p in pngs))
    return 0


def cell_key(needle: str, length: int, depth: float) -> tuple:
    return needle, length, float(depth)


def earlier_cells(path: Path, result: dict) -> dict:
    """Finished cells of an earlier ``needle.json`` that the new run can keep, per
    (method, KV size): same model, answer length and needle texts; any lengths and
    depths, so a grid can be widened without re-running what it already has. Each
    entry is (the earlier run's record, {cell key: row})."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    same = (data.get("format") == FORMAT and data.get("model") == result["model"]
            and data["grid"].get("max_tokens") == result["grid"]["max_tokens"])
    if not same:
        print(f"--resume: {path} used another model or answer length; starting over.", file=sys.stderr)
        return {}
    needles = {n["name"]: n for n in result["needles"]}
    kept = {n["name"] for n in data.get("needles", []) if needles.get(n["name"]) == n}
    return earlier_rows(data.get("runs", []), "cells", _row_key, lambda c: c["needle"] in kept)


def _row_key(row: dict) -> tuple:
    return cell_key(row["needle"], row["length"], row["depth"])


def _evaluate(method: Method, cells: list, chats: list, args: argparse.Namespace, out: Path) -> dict:
    from headkv_vllm.tools.eval.needle_prompts import chat_options, score

    asks = [Ask(chat, args.max_tokens, chat_options(needle)) for (needle, _, _), chat in zip(cells, chats)]
    answers, run = ask_method(method, asks, model=args.model, base_url=args.base_url,
                              max_model_len=max(args.length_list) + args.max_tokens + 64,
                              kv_cache_bytes=args.kv_cache_bytes, concurrency=args.concurrency,
                              log_dir=out / "logs", unit="cell")
    rows = []
    for (needle, length, depth), (text, prompt_tokens) in zip(cells, answers):
        rows.append({"needle": needle.name, "kind": needle.kind, "length": length, "depth": depth,
                     "prompt_tokens": prompt_tokens, "response": text, **score(text, needle)})
    return {**run, "cells": rows}


def summarize(runs: list[dict], length_range: tuple[int, int]) -> list[dict]:
    """Mean scores per run, over all cells and over cells within ``length_range``; and as
    a share of the full cache's (when the full cache ran)."""
    lo, hi = length_range

    def means(cells):
        n = len(cells) or 1
        return 100 * sum(c["rouge1"] for c in cells) / n, 100 * sum(c["contains"] for c in cells) / n

    rows = []
    for run in runs:
        in_range = [c for c in run["cells"] if lo <= c["length"] <= hi]
        (r_all, c_all), (r_rng, c_rng) = means(run["cells"]), means(in_range)
        rows.append({"method": run["method"], "kv_size": run["kv_size"], "label": run["label"],
                     "rouge1": r_all, "contains": c_all, "rouge1_range": r_rng, "contains_range": c_rng})
    full = next((r for r in rows if r["method"] == FULL), None)
    for row in rows:
        for key in ("rouge1", "contains", "rouge1_range", "contains_range"):
            row[f"{key}_pct_of_full"] = 100 * row[key] / full[key] if full and full[key] else None
    return rows


def summary_table(rows: list[dict], length_range: tuple[int, int]) -> str:
    span = length_span(length_range)
    pct = lambda v: "-" if v is None else f"{v:.0f}%"
    lines = [f"| method | KV size | ROUGE-1 recall, all lengths | % of full | ROUGE-1 recall, {span} tokens | "
             f"% of full | contains, {span} | % of full |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=table_order):
        lines.append(f"| {r['label'].split(' @ ')[0]} | {r['kv_size'] or 'full'} | {r['rouge1']:.1f} | "
                     f"{pct(r['rouge1_pct_of_full'])} | {r['rouge1_range']:.1f} | {pct(r['rouge1_range_pct_of_full'])} | "
                     f"{r['contains_range']:.1f} | {pct(r['contains_range_pct_of_full'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
