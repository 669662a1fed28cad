"""``headkv-vllm eval-ruler``: RULER-style synthetic long-context tasks (needle retrieval
with several keys and values, variable tracking, common and frequent words extraction)
for each KV-cache method, measured through the OpenAI API of a real ``vllm serve``.

For each method (full cache = stock vLLM; SnapKV, PyramidKV, HeadKV-R, HeadKV-R2 at
each KV size) one server is started, every sample (task x length x index) is sent at
once, greedy, and each answer is scored with RULER's metric (the share of the expected
strings it contains). Writes ``ruler.json``, ``summary.md`` (a column per task, their
average and its share of the full cache's), ``summary.png`` (average score against KV
size per method) and ``tasks.png`` (score per task and method).

    headkv-vllm eval-ruler --model models/SmolLM2-135M-Instruct \\
        --methods full,headkv-r2,headkv-r,snapkv,pyramidkv --kv-sizes 64,128 \\
        --lengths 4000 --samples 5 --out results/ruler

``--base-url`` evaluates a server that is already running instead (one method).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from headkv_vllm.tools.eval.runs import (Ask, add_method_options, ask_method, check_method_options, earlier_rows,
                                        methods_of, run_methods, table_order)
from headkv_vllm.tools.common.methods import FULL, Method, MethodError, parse_ints
from headkv_vllm.tools.eval.ruler_tasks import CHAT_OPTIONS, MAX_TOKENS, METRIC, TASKS, Sample, score

FORMAT = "headkv-eval-ruler/1"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="headkv-vllm eval-ruler", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_method_options(p)
    p.add_argument("--lengths", default="4000", help="prompt lengths in tokens (after the chat template)")
    p.add_argument("--tasks", default="all", help="'all' or comma-separated tasks: " + ", ".join(TASKS))
    p.add_argument("--samples", type=int, default=5, help="samples per task and length")
    p.add_argument("--seed", type=int, default=42, help="seed of the generated samples")
    p.add_argument("--max-tokens", default="", help="answer length limit: N for every task, or TASK=N,... "
                   "(default RULER's: " + ", ".join(f"{t} {n}" for t, n in MAX_TOKENS.items()) + ")")
    p.add_argument("--resume", action="store_true",
                   help="keep finished samples from an earlier ruler.json in --out; run only the missing ones")
    p.add_argument("--out", default="results/ruler", help="output folder")
    args = p.parse_args(argv)
    check_method_options(p, args)
    try:
        args.length_list = parse_ints(args.lengths, "--lengths", minimum=128)
        args.task_list = select_tasks(args.tasks)
        args.max_tokens_of = parse_max_tokens(args.max_tokens, args.task_list)
    except MethodError as e:
        p.error(str(e))
    if args.samples < 1:
        p.error(f"--samples: give at least 1 sample per task and length; got {args.samples}.")
    return args


def select_tasks(text: str) -> list[str]:
    if text == "all":
        return list(TASKS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TASKS]
    if bad or not names:
        raise MethodError(f"--tasks: unknown task(s) {', '.join(bad) or '(none)'}; use 'all' or some of "
                          f"{', '.join(TASKS)}.")
    return list(dict.fromkeys(names))


def parse_max_tokens(text: str, tasks: list[str]) -> dict[str, int]:
    """``--max-tokens``: '' (RULER's per task), 'N' (every task) or 'TASK=N,...' (those tasks)."""
    limits = {t: MAX_TOKENS[t] for t in tasks}
    if not text.strip():
        return limits
    fix = "give N or TASK=N,..., e.g. 64 or cwe=64,fwe=32"
    if text.strip().isdigit():
        return {t: _positive(text.strip(), fix) for t in tasks}
    for item in text.split(","):
        task, sep, value = item.partition("=")
        task = task.strip()
        if not sep or task not in TASKS:
            raise MethodError(f"--max-tokens: {item.strip()!r} is not TASK=N with a task of {', '.join(TASKS)}; {fix}.")
        if task in limits:
            limits[task] = _positive(value.strip(), fix)
    return limits


def _positive(value: str, fix: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise MethodError(f"--max-tokens: {value!r} is not a positive integer; {fix}.")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        methods = methods_of(args)
    except MethodError as e:
        print(f"headkv-vllm eval-ruler: error: {e}", file=sys.stderr)
        return 2
    command = "headkv-vllm eval-ruler " + shlex.join(argv)
    return run_eval(args, methods, command)


def run_eval(args: argparse.Namespace, methods: list[Method], command: str) -> int:
    from transformers import AutoTokenizer

    from headkv_vllm.tools.common.machine import machine_info
    from headkv_vllm.tools.eval.ruler_tasks import RulerTasks
    from headkv_vllm.tools.common.serve_process import stop_servers_on_sigterm

    stop_servers_on_sigterm()

    tasks = RulerTasks(AutoTokenizer.from_pretrained(args.model), args.seed)
    try:
        samples = [tasks.build(task, length, i) for task in args.task_list for length in args.length_list
                   for i in range(args.samples)]
    except ValueError as e:
        print(f"headkv-vllm eval-ruler: error: {e}", file=sys.stderr)
        return 2
    fingerprints = {sample_key(s.task, s.length, s.index): s.fingerprint(args.max_tokens_of[s.task]) for s in samples}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "ruler.json"
    grid = {"tasks": args.task_list, "lengths": args.length_list, "samples": args.samples, "seed": args.seed,
            "max_tokens": args.max_tokens_of, "metrics": {t: METRIC[t] for t in args.task_list}}
    result = {"format": FORMAT, "command": command, "machine": machine_info(), "model": Path(args.model).name,
              "grid": grid, "runs": []}
    earlier = earlier_samples(json_path, result, fingerprints) if args.resume else {}

    def evaluate(method: Method, todo: list[int]) -> dict:
        return _evaluate(method, [samples[i] for i in todo], args, out)

    def save(runs: list[dict]) -> None:
        result["runs"] = runs
        result["summary"] = summarize(runs, args.task_list)
        json_path.write_text(json.dumps(result, indent=1))

    run_methods(methods, list(fingerprints), earlier, "samples", _row_key, evaluate, save)
    table = summary_table(result["summary"], args.task_list)
    (out / "summary.md").write_text(table + "\n")
    from headkv_vllm.tools.common.plots import ruler_task_heatmap, score_vs_kv_plot

    pngs = [score_vs_kv_plot(result["summary"], "average", "average score over the tasks",
                             f"RULER-style tasks, {result['model']}", out / "summary.png"),
            ruler_task_heatmap(result, out / "tasks.png")]
    print(table)
    print(f"wrote {json_path}, {out / 'summary.md'}, " + ", ".join(str(p) for p in pngs))
    return 0


def sample_key(task: str, length: int, index: int) -> tuple:
    return task, length, index


def _row_key(row: dict) -> tuple:
    return sample_key(row["task"], row["length"], row["index"])


def earlier_samples(path: Path, result: dict, fingerprints: dict) -> dict:
    """Finished samples of an earlier ``ruler.json`` that the new run can keep, per
    (method, KV size): same model, and the same request (prompt, expected answer, metric
    and answer length, compared by fingerprint); any tasks, lengths and sample counts,
    so a run can be widened without re-running what it already has."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT or data.get("model") != result["model"]:
        print(f"--resume: {path} is not an eval-ruler result of {result['model']}; starting over.", file=sys.stderr)
        return {}
    return earlier_rows(data.get("runs", []), "samples", _row_key,
                        lambda r: fingerprints.get(_row_key(r)) == r.get("fingerprint"))


def _evaluate(method: Method, samples: list[Sample], args: argparse.Namespace, out: Path) -> dict:
    asks = [Ask(s.messages, args.max_tokens_of[s.task], CHAT_OPTIONS) for s in samples]
    answers, run = ask_method(method, asks, model=args.model, base_url=args.base_url,
                              max_model_len=max(args.length_list) + max(args.max_tokens_of.values()) + 64,
                              kv_cache_bytes=args.kv_cache_bytes, concurrency=args.concurrency,
                              log_dir=out / "logs", unit="sample")
    rows = []
    for s, (text, prompt_tokens) in zip(samples, answers):
        rows.append({"task": s.task, "length": s.length, "index": s.index, "prompt_tokens": prompt_tokens,
                     "answer": text, "expected": s.outputs, "score": score(text, s.outputs, s.metric),
                     "fingerprint": s.fingerprint(args.max_tokens_of[s.task])})
    return {**run, "samples": rows}


def summarize(runs: list[dict], tasks: list[str]) -> list[dict]:
    """Per run: the mean score (0-100) of each task and their average, overall and per
    length; and the average as a share of the full cache's (when the full cache ran)."""
    def mean(values: list[float]) -> float:
        return 100 * sum(values) / len(values) if values else 0.0

    rows = []
    for run in runs:
        per_task = {t: mean([r["score"] for r in run["samples"] if r["task"] == t]) for t in tasks}
        lengths = sorted({r["length"] for r in run["samples"]})
        by_length = {str(n): sum(mean([r["score"] for r in run["samples"] if r["task"] == t and r["length"] == n])
                                 for t in tasks) / len(tasks) for n in lengths}
        rows.append({"method": run["method"], "kv_size": run["kv_size"], "label": run["label"], "tasks": per_task,
                     "average": sum(per_task.values()) / len(tasks), "by_length": by_length})
    full = next((r for r in rows if r["method"] == FULL), None)
    for row in rows:
        row["average_pct_of_full"] = 100 * row["average"] / full["average"] if full and full["average"] else None
    return sorted(rows, key=table_order)


def summary_table(rows: list[dict], tasks: list[str]) -> str:
    lengths = list(rows[0]["by_length"]) if rows else []
    per_length = [f"average, {n} tokens" for n in lengths] if len(lengths) > 1 else []
    head = ["method", "KV size", *tasks, "average", "% of full", *per_length]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pct = "-" if r["average_pct_of_full"] is None else f"{r['average_pct_of_full']:.0f}%"
        cells = [r["label"].split(" @ ")[0], str(r["kv_size"] or "full"), *(f"{r['tasks'][t]:.1f}" for t in tasks),
                 f"{r['average']:.1f}", pct, *(f"{r['by_length'][n]:.1f}" for n in lengths if per_length)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
