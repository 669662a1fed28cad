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
import asyncio
import json
import shlex
import sys
import time
from pathlib import Path

from headkv_vllm.tools.eval_needles import NEEDLES, Needle
from headkv_vllm.tools.methods import (FULL, Method, MethodError, build_methods, model_identity, parse_ints,
                                 parse_names)

FORMAT = "headkv-eval-needle/1"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="headkv-vllm eval-needle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct", help="local model folder (served as is)")
    p.add_argument("--methods", default="full,headkv-r2,headkv-r,snapkv,pyramidkv",
                   help="comma-separated: full, headkv-r2, headkv-r, snapkv, pyramidkv")
    p.add_argument("--kv-sizes", default="32,64,128,256", help="average KV sizes (tokens per KV head) to compare")
    p.add_argument("--lengths", default="500,1000,1500,2000,2500,3000,3500,4000", help="context lengths in tokens")
    p.add_argument("--depths", default="0,25,50,75,100", help="needle depths in percent of the document")
    p.add_argument("--needles", default="all", help="'all' or comma-separated needle names: "
                   + ", ".join(n.name for n in NEEDLES))
    p.add_argument("--scores-r", help="score file for headkv-r (default: the 'R' file for the model in configs/)")
    p.add_argument("--scores-r2", help="score file for headkv-r2 (default: the 'R2' file for the model in configs/)")
    p.add_argument("--headkv-settings", default="{}", help="JSON merged into every HEADKV config, e.g. '{\"beta\": 1.2}'")
    p.add_argument("--summary-lengths", default="1000:3000", help="MIN:MAX context lengths of the headline column")
    p.add_argument("--max-tokens", type=int, default=32, help="answer length limit")
    p.add_argument("--concurrency", type=int, default=0, help="requests in flight per server (0: all cells at once)")
    p.add_argument("--kv-cache-bytes", type=int, help="fixed KV cache size (default: --gpu-memory-utilization 0.3)")
    p.add_argument("--base-url", help="evaluate this running server (one method, one KV size) instead of starting servers")
    p.add_argument("--resume", action="store_true", help="keep finished cells from an earlier needle.json in --out; run only the missing ones")
    p.add_argument("--out", default="results/needle", help="output folder")
    args = p.parse_args(argv)
    try:
        args.method_names = parse_names(args.methods, "--methods")
        args.kv_size_list = parse_ints(args.kv_sizes, "--kv-sizes", minimum=9)
        args.length_list = parse_ints(args.lengths, "--lengths", minimum=64)
        args.depth_list = [float(d) for d in parse_ints(args.depths, "--depths", minimum=0)]
        args.needle_list = select_needles(args.needles)
        args.settings = json.loads(args.headkv_settings)
        lo, _, hi = args.summary_lengths.partition(":")
        args.summary_range = (int(lo), int(hi))
    except json.JSONDecodeError as e:
        p.error(f"--headkv-settings is not valid JSON ({e}); pass e.g. '{{\"beta\": 1.2}}'.")
    except ValueError as e:
        p.error(str(e) if isinstance(e, MethodError) else f"--summary-lengths: use MIN:MAX, e.g. 1000:3000 ({e}).")
    if max(args.depth_list) > 100:
        p.error("--depths: percentages must be within 0..100.")
    if args.base_url and (len(args.method_names) != 1 or (args.method_names != [FULL] and len(args.kv_size_list) != 1)):
        p.error("--base-url evaluates one running server: give exactly one --methods entry and one --kv-sizes value "
                "(the ones the server runs).")
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
        methods = build_methods(args.method_names, args.kv_size_list, model_identity(args.model),
                                {"headkv-r": args.scores_r, "headkv-r2": args.scores_r2}, args.settings)
    except MethodError as e:
        print(f"headkv-vllm eval-needle: error: {e}", file=sys.stderr)
        return 2
    command = "headkv-vllm eval-needle " + shlex.join(argv)
    return run_eval(args, methods, command)


def run_eval(args: argparse.Namespace, methods: list[Method], command: str) -> int:
    from transformers import AutoTokenizer

    from headkv_vllm.tools.machine import machine_info
    from headkv_vllm.tools.needle_prompts import NeedlePrompts
    from headkv_vllm.tools.serve_process import stop_servers_on_sigterm

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
    for method in methods:
        done_run, done = earlier.get((method.name, method.kv_size), (None, {}))
        if done_run and done_run["headkv"] != _portable(method.headkv):
            done_run, done = None, {}
        todo = [i for i, (n, length, depth) in enumerate(cells) if cell_key(n.name, length, depth) not in done]
        run = done_run
        if todo:
            run = _evaluate(method, [cells[i] for i in todo], [chats[i] for i in todo], args, out)
            if done_run:
                run["wall_s"] = round(run["wall_s"] + done_run["wall_s"], 1)
        rows = {**done, **{cell_key(r["needle"], r["length"], r["depth"]): r for r in run["cells"]}}
        run["cells"] = [rows[cell_key(n.name, length, depth)] for n, length, depth in cells]
        result["runs"].append(run)
        result["summary"] = summarize(result["runs"], args.summary_range)
        json_path.write_text(json.dumps(result, indent=1))
    table = summary_table(result["summary"], args.summary_range)
    (out / "summary.md").write_text(table + "\n")
    from headkv_vllm.tools.plots import needle_heatmaps, needle_summary_plot

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
    earlier = {}
    for run in data.get("runs", []):
        rows = {cell_key(c["needle"], c["length"], c["depth"]): c for c in run["cells"] if c["needle"] in kept}
        earlier[(run["method"], run["kv_size"])] = run, rows
    return earlier


def _evaluate(method: Method, cells: list, chats: list, args: argparse.Namespace, out: Path) -> dict:
    from headkv_vllm.tools.serve_process import ServerConfig, VllmServer

    started = time.monotonic()
    if args.base_url:
        answers = asyncio.run(_ask_all(args.base_url, None, chats, [c[0] for c in cells], args, method.label))
        server_info = {"base_url": args.base_url}
    else:
        max_len = -(-(max(args.length_list) + args.max_tokens + 64) // 16) * 16
        config = ServerConfig(model=args.model, headkv=method.headkv, max_model_len=max_len,
                              kv_cache_memory_bytes=args.kv_cache_bytes)
        slug = method.name if method.kv_size is None else f"{method.name}_{method.kv_size}"
        with VllmServer(config, out / "logs" / f"{slug}.log") as server:
            answers = asyncio.run(_ask_all(server.base_url, args.model, chats, [c[0] for c in cells], args, method.label))
            server_info = {"command": "vllm serve " + shlex.join(server.command[2:]).replace(str(server.port), "PORT"),
                           "headkv_pool": server.headkv_pool(), "vllm_logged_kv_tokens": server.logged_kv_tokens()}
    from headkv_vllm.tools.needle_prompts import score

    rows = []
    for (needle, length, depth), (text, prompt_tokens) in zip(cells, answers):
        rows.append({"needle": needle.name, "kind": needle.kind, "length": length, "depth": depth,
                     "prompt_tokens": prompt_tokens, "response": text, **score(text, needle)})
    return {"method": method.name, "kv_size": method.kv_size, "label": method.label,
            "headkv": _portable(method.headkv), "server": server_info,
            "wall_s": round(time.monotonic() - started, 1), "cells": rows}


async def _ask_all(base_url: str, model: str | None, chats: list, needles: list[Needle], args: argparse.Namespace,
                   label: str) -> list:
    from openai import AsyncOpenAI
    from tqdm import tqdm

    from headkv_vllm.tools.needle_prompts import chat_options

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=3600, max_retries=0)
    if model is None:
        model = (await client.models.list()).data[0].id
    limit = asyncio.Semaphore(args.concurrency or len(chats))

    async def ask(i: int, messages: list[dict]):
        options = chat_options(needles[i])
        async with limit:
            reply = await client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                                         temperature=0.0, extra_body=options)
        return i, reply.choices[0].message.content or "", reply.usage.prompt_tokens

    answers: list = [None] * len(chats)
    with tqdm(total=len(chats), desc=f"{label:>18}", unit="cell") as bar:
        for done in asyncio.as_completed([ask(i, m) for i, m in enumerate(chats)]):
            i, text, prompt_tokens = await done
            answers[i] = (text, prompt_tokens)
            bar.update()
    await client.close()
    return answers


def _portable(settings: dict | None) -> dict | None:
    """Settings as recorded: a score file inside the project is named relative to it."""
    if not settings or "scores" not in settings:
        return settings
    root = Path(__file__).resolve().parents[2]
    path = Path(settings["scores"]).resolve()
    shown = str(path.relative_to(root)) if path.is_relative_to(root) else settings["scores"]
    return {**settings, "scores": shown}


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
    lo, hi = length_range
    pct = lambda v: "-" if v is None else f"{v:.0f}%"
    lines = [f"| method | KV size | ROUGE-1 recall, all lengths | % of full | ROUGE-1 recall, {lo}-{hi} tokens | "
             f"% of full | contains, {lo}-{hi} | % of full |", "|---|---|---|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate(("full", "headkv-r2", "headkv-r", "snapkv", "pyramidkv"))}
    for r in sorted(rows, key=lambda r: (r["kv_size"] or 0, order.get(r["method"], 9))):
        lines.append(f"| {r['label'].split(' @ ')[0]} | {r['kv_size'] or 'full'} | {r['rouge1']:.1f} | "
                     f"{pct(r['rouge1_pct_of_full'])} | {r['rouge1_range']:.1f} | {pct(r['rouge1_range_pct_of_full'])} | "
                     f"{r['contains_range']:.1f} | {pct(r['contains_range_pct_of_full'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
