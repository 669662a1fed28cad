"""``headkv-vllm calibrate``: choose HeadKV's beta per KV size (and the observation
window) for one model and score file, on needle prompts of its own, and record the
choice in the score file, where the engine takes it as its default.

The paper tunes beta per model and KV size. This does the same, through the engine:
one HEADKV server per (window, beta) of the grid, every calibration prompt asked at
every KV size (a per-request ``headkv_kv_size``), greedy answers scored by ROUGE-1
recall of the needle's answer. The window is chosen for the model (the one whose best
beta per KV size scores highest on average), then beta per KV size at that window.
Ties go to the earlier value of ``--windows`` / ``--betas``, so list the paper's
settings (window 8, beta 1.01) first.

The calibration prompts share nothing with the evaluations: their own needles
(:data:`CALIBRATION_NEEDLES`, none of eval-needle's or of the scoring probes') in the
second half of the haystack (eval-needle's documents start at its first token).

    headkv-vllm calibrate --model models/SmolLM2-135M-Instruct \\
        --scores configs/SmolLM2-135M-Instruct_R2.json --kv-sizes 64,128,256 \\
        --betas 1.01,1.2,1.5,2 --windows 8,32 --out results/calibration/SmolLM2-135M-Instruct_R2
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from headkv_vllm.tools.common.needle import Needle

FORMAT = "headkv-calibration/1"

CALIBRATION_NEEDLES = (
    Needle("lighthouse-keeper", "retrieval", ("The lighthouse on Corran Point is kept by a man named Tobias Wren.",),
           "Who keeps the lighthouse on Corran Point?", "Tobias Wren"),
    Needle("orchard-apple", "retrieval", ("The orchard at Hollins Farm grows a red apple called the Ember Queen.",),
           "What apple does the orchard at Hollins Farm grow?", "Ember Queen"),
    Needle("train-platform", "retrieval", ("The night train to Valmora leaves from platform 17.",),
           "Which platform does the night train to Valmora leave from?", "17"),
    Needle("bakery-bread", "retrieval", ("The bakery on Linden Street is known for its rosemary bread.",),
           "What is the bakery on Linden Street known for?", "rosemary bread"),
    Needle("pet-by-city", "reasoning",
           ("Irene lives in Oslo and Marco lives in Lisbon.", "Irene owns a parrot and Marco owns a tortoise."),
           "Which pet does the person who lives in Oslo own?", "parrot", distractor="tortoise",
           answer_prefix="The person who lives in Oslo owns a"),
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    from headkv_vllm.tools.common.methods import MethodError, parse_ints

    p = argparse.ArgumentParser(prog="headkv-vllm calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct", help="local model folder (served as is)")
    p.add_argument("--scores", required=True, help="the score file to calibrate (the choice is written into it)")
    p.add_argument("--kv-sizes", default="64,128,256", help="KV sizes to choose a beta for")
    p.add_argument("--betas", default="1.01,1.2,1.5,2", help="beta values to try (the paper's 1.01 first)")
    p.add_argument("--windows", default="8,32", help="observation windows to try (the paper's 8 first)")
    p.add_argument("--lengths", default="1000,2000,3000", help="prompt lengths in tokens")
    p.add_argument("--depths", default="10,50,90", help="needle depths in percent of the document")
    p.add_argument("--max-tokens", type=int, default=32, help="answer length limit")
    p.add_argument("--kv-cache-bytes", type=int, help="fixed KV cache size (default: --gpu-memory-utilization 0.3)")
    p.add_argument("--resume", action="store_true", help="keep finished grid points of an earlier calibration.json in --out")
    p.add_argument("--dry-run", action="store_true", help="measure and report, but leave the score file as it is")
    p.add_argument("--out", required=True, help="output folder (calibration.json, summary.md, calibration.png)")
    args = p.parse_args(argv)
    try:
        args.kv_size_list = sorted(parse_ints(args.kv_sizes, "--kv-sizes", minimum=9))
        args.window_list = parse_ints(args.windows, "--windows", minimum=1)
        args.length_list = parse_ints(args.lengths, "--lengths", minimum=64)
        args.depth_list = [float(d) for d in parse_ints(args.depths, "--depths", minimum=0)]
    except MethodError as e:
        p.error(str(e))
    try:
        args.beta_list = [float(b) for b in args.betas.split(",") if b.strip()]
    except ValueError:
        p.error(f"--betas: {args.betas!r} is not a comma-separated list of numbers, e.g. 1.01,1.2,1.5.")
    if not args.beta_list or min(args.beta_list) <= 1:
        p.error(f"--betas: every beta must be > 1 (the paper's default is 1.01); got {args.betas!r}.")
    if min(args.kv_size_list) <= max(args.window_list):
        p.error(f"--kv-sizes: every KV size must exceed every window (KV sizes count the window); "
                f"smallest KV size {min(args.kv_size_list)}, largest window {max(args.window_list)}.")
    if max(args.depth_list) > 100:
        p.error("--depths: percentages must be within 0..100.")
    if not Path(args.scores).is_file():
        p.error(f"--scores: {args.scores} is not a file; pass the score file to calibrate (configs/<model>_<probe>.json).")
    return args


def grid_key(window: int, beta: float) -> str:
    return f"window {window}, beta {beta:g}"


def choose(table: dict, windows: list[int], betas: list[float], kv_sizes: list[int]) -> dict:
    """The calibrated settings from ``table[grid_key][str(kv_size)]`` (mean scores): the
    window whose best beta per KV size scores highest on average, then the best beta per
    KV size at that window; ties go to the earlier listed value."""
    def best_beta(window: int, kv: int) -> float:
        return max(betas, key=lambda b: (table[grid_key(window, b)][str(kv)], -betas.index(b)))

    def window_score(window: int) -> float:
        return sum(table[grid_key(window, best_beta(window, kv))][str(kv)] for kv in kv_sizes) / len(kv_sizes)

    window = max(windows, key=lambda w: (window_score(w), -windows.index(w)))
    # the window is written even when only one was tried: the betas were chosen at it
    return {"beta": {str(kv): best_beta(window, kv) for kv in kv_sizes}, "window": window}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from headkv_vllm.method.scores import ScoreFileError, load_scores
    from headkv_vllm.tools.eval.runs import Ask, ask_method
    from headkv_vllm.tools.common.machine import machine_info
    from headkv_vllm.tools.common.methods import Method, model_identity
    from headkv_vllm.tools.eval.needle_prompts import NeedlePrompts, chat_options, score
    from headkv_vllm.tools.common.serve_process import stop_servers_on_sigterm

    try:
        scores = load_scores(args.scores, calibration=False)  # a calibration is what this replaces
        scores.check_model(model_identity(args.model))
    except (ScoreFileError, ValueError) as e:
        print(f"headkv-vllm calibrate: error: --scores: {e}", file=sys.stderr)
        return 2
    stop_servers_on_sigterm()
    prompts = NeedlePrompts(AutoTokenizer.from_pretrained(args.model))
    offset = len(prompts.haystack) // 2
    cells = [(n, length, depth) for n in CALIBRATION_NEEDLES for length in args.length_list for depth in args.depth_list]
    try:
        chats = [prompts.build(n, length, depth, offset=offset) for n, length, depth in cells]
    except ValueError as e:
        print(f"headkv-vllm calibrate: error: {e}", file=sys.stderr)
        return 2
    asks = [Ask(chat, args.max_tokens, {**chat_options(n), "vllm_xargs": {"headkv_kv_size": kv}})
            for kv in args.kv_size_list for (n, _, _), chat in zip(cells, chats)]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "calibration.json"
    prompt_set = {"needles": [n.as_dict() for n in CALIBRATION_NEEDLES], "lengths": args.length_list,
                  "depths": args.depth_list, "haystack_offset_tokens": offset, "max_tokens": args.max_tokens}
    result = {"format": FORMAT, "command": "headkv-vllm calibrate " + shlex.join(argv), "machine": machine_info(),
              "model": Path(args.model).name, "scores": str(args.scores), "probe": scores.probe,
              "kv_sizes": args.kv_size_list, "windows": args.window_list, "betas": args.beta_list,
              "prompts": prompt_set, "table": {}, "runs": {}}
    if args.resume and json_path.exists():
        earlier = json.loads(json_path.read_text())
        same = {k: (earlier.get(k), result[k]) for k in ("prompts", "model", "scores", "probe")}
        changed = [k for k, (a, b) in same.items() if a != b]
        if changed:
            print(f"--resume: {json_path} was made with other {', '.join(changed)}; starting over.", flush=True)
        else:
            grid = {grid_key(w, b) for w in args.window_list for b in args.beta_list}
            result["runs"] = {k: r for k, r in earlier.get("runs", {}).items()
                              if k in grid and all(str(kv) in r["mean_rouge1"] for kv in args.kv_size_list)}

    for window in args.window_list:
        for beta in args.beta_list:
            key = grid_key(window, beta)
            if key in result["runs"]:
                result["runs"][key] = result["runs"].pop(key)  # grid order
                continue
            settings = {"policy": "headkv", "scores": str(args.scores), "kv_size": max(args.kv_size_list),
                        "beta": beta, "window": window}
            method = Method("headkv-r2" if scores.probe == "R2" else "headkv-r", max(args.kv_size_list), settings)
            answers, record = ask_method(method, asks, model=args.model, base_url=None,
                                         max_model_len=max(args.length_list) + args.max_tokens + 64,
                                         kv_cache_bytes=args.kv_cache_bytes, concurrency=0,
                                         log_dir=out / "logs" / key.replace(", ", "_").replace(" ", "-"), unit="prompt")
            rows = []
            for i, (text, prompt_tokens) in enumerate(answers):
                kv = args.kv_size_list[i // len(cells)]
                needle, length, depth = cells[i % len(cells)]
                rows.append({"kv_size": kv, "needle": needle.name, "length": length, "depth": depth,
                             "prompt_tokens": prompt_tokens, "answer": text, **score(text, needle)})
            mean = {str(kv): round(100 * sum(r["rouge1"] for r in rows if r["kv_size"] == kv) / len(cells), 2)
                    for kv in args.kv_size_list}
            result["runs"][key] = {"window": window, "beta": beta, "mean_rouge1": mean, "server": record["server"],
                                   "wall_s": record["wall_s"], "rows": rows}
            print(f"{key}: ROUGE-1 recall " + ", ".join(f"KV {k}: {v}" for k, v in mean.items()), flush=True)
            json_path.write_text(json.dumps(result, indent=1))

    result["table"] = {k: r["mean_rouge1"] for k, r in result["runs"].items()}
    chosen = choose(result["table"], args.window_list, args.beta_list, args.kv_size_list)
    result["chosen"] = chosen
    json_path.write_text(json.dumps(result, indent=1))
    table = summary_table(result)
    (out / "summary.md").write_text(table + "\n")
    from headkv_vllm.tools.common.plots import calibration_plot

    png = calibration_plot(result, out / "calibration.png")
    print(table)
    if not args.dry_run:
        write_calibration(Path(args.scores), chosen, result, json_path)
        print(f"wrote the calibration into {args.scores}")
    print(f"wrote {json_path}, {out / 'summary.md'}, {png}")
    return 0


def write_calibration(path: Path, chosen: dict, result: dict, json_path: Path) -> None:
    """Put the choice (and where it came from) under the score file's key 'calibration',
    keeping every other key as it is; the file is read back as the engine reads it."""
    from headkv_vllm.method.scores import _dump, load_scores

    import os

    data = json.loads(path.read_text())
    data["calibration"] = {
        **chosen,
        "metric": "mean ROUGE-1 recall (percent) of the needle's answer, greedy",
        "table": result["table"],
        "prompts": {k: v for k, v in result["prompts"].items() if k != "needles"}
        | {"needles": [n["name"] for n in result["prompts"]["needles"]]},
        "command": result["command"],
        "results": str(json_path),
        "commit": result["machine"].get("git_commit"),
    }
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(_dump(data) + "\n")
    load_scores(tmp)  # the engine must accept it before it replaces the file
    os.replace(tmp, path)


def summary_table(result: dict) -> str:
    kvs = result["kv_sizes"]
    lines = [f"Calibration of {result['scores']} ({result['model']}, probe {result['probe']}): mean ROUGE-1 recall "
             "on the calibration prompts", "",
             "| window | beta | " + " | ".join(f"KV {k}" for k in kvs) + " |",
             "|---|---|" + "---|" * len(kvs)]
    chosen = result.get("chosen", {})
    for key, run in result["runs"].items():
        cells = []
        for kv in kvs:
            v = f"{run['mean_rouge1'][str(kv)]:.1f}"
            picked = run["window"] == chosen.get("window", run["window"]) and chosen.get("beta", {}).get(str(kv)) == run["beta"]
            cells.append(f"**{v}**" if picked else v)
        lines.append(f"| {run['window']} | {run['beta']:g} | " + " | ".join(cells) + " |")
    if chosen:
        lines += ["", "Chosen (bold): " + (f"window {chosen['window']}; " if "window" in chosen else "")
                  + "beta " + ", ".join(f"KV {k}: {b:g}" for k, b in chosen["beta"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
