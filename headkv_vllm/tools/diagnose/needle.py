"""``headkv-vllm diagnose-needle``: which prompt tokens each KV head keeps of
eval-needle's prompts, and how much of the needle's answer survives, per policy,
beta, window and pooling, without a server.

Each prompt (built as eval-needle builds it, same chat template) runs once through
transformers on the CPU in float32; the post-RoPE keys and the last queries of every
layer are kept. Per configuration the engine's own budget, scoring and selection code
(``diagnose_select``) picks each KV head's tokens; the report is the share of the
needle's answer tokens each head keeps, its budget, and the window's text.

``--window-ends user-text`` is an analysis switch only (the engine always scores with
the last prompt tokens): the window ends at the user's last token instead, before
the template's end-of-turn and assistant header; the template tokens after it are
kept on top of the budget.

    headkv-vllm diagnose-needle --windows 8,16,32,64 --betas 1.01,1.2,1.5,2 --out results/diagnosis

Writes ``diagnosis.json``, ``heatmap_<method>[_beta<b>]_<window end>.png`` (layers x KV
heads per window: colour = answer retention, number = budget) and ``summary.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

from headkv_vllm.tools.eval.needle import select_needles
from headkv_vllm.tools.common.methods import LABELS, POLICY_OF, MethodError, find_probe_scores, parse_ints

FORMAT = "headkv-diagnose-needle/1"
METHODS = ("headkv-r2", "headkv-r", "snapkv", "pyramidkv")
WINDOW_ENDS = ("last", "user-text")
DEFAULT_NEEDLES = "ship-name,village-jam,museum-violin,vault-code,instrument-by-year"
REFERENCE_MODES = ("sample", "all", "off")
KEPT_NEEDLE = 0.5  # a head "keeps the needle" when it keeps at least this share of the answer tokens


@dataclasses.dataclass(frozen=True)
class Config:
    method: str
    beta: float | None  # None: the policy has no beta
    kv_size: int
    window: int
    pool_kernel: int
    window_end: str

    @property
    def setting(self) -> tuple[int, int, str]:
        """What the window scores depend on."""
        return self.window, self.pool_kernel, self.window_end

    def name(self) -> str:
        beta = "" if self.beta is None else f" beta {self.beta:g}"
        return (f"{self.method}{beta} kv {self.kv_size} window {self.window} pool {self.pool_kernel} "
                f"end {self.window_end}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="headkv-vllm diagnose-needle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct", help="local model folder")
    p.add_argument("--needles", default=DEFAULT_NEEDLES, help="'all' or comma-separated eval-needle needle names")
    p.add_argument("--lengths", default="2000", help="prompt lengths in tokens (as eval-needle's --lengths)")
    p.add_argument("--depths", default="50", help="needle depths in percent of the document")
    p.add_argument("--methods", default="headkv-r2,headkv-r,snapkv", help="comma-separated: " + ", ".join(METHODS))
    p.add_argument("--kv-sizes", default="128", help="average KV sizes (tokens per KV head, window included)")
    p.add_argument("--windows", default="8,16,32,64", help="observation window sizes")
    p.add_argument("--pool-kernels", default="7,1", help="max-pool kernels (odd; 1 = no pooling)")
    p.add_argument("--betas", default="1.01,1.2,1.5,2", help="HeadKV betas (> 1), for the headkv methods")
    p.add_argument("--window-ends", default="last,user-text",
                   help="'last' (the engine: last prompt tokens) and/or 'user-text' (analysis: ends at the user's text)")
    p.add_argument("--scores-r", help="score file for headkv-r (default: the 'R' file for the model in configs/)")
    p.add_argument("--scores-r2", help="score file for headkv-r2 (default: the 'R2' file for the model in configs/)")
    p.add_argument("--heatmap-betas", default="1.01", help="betas drawn as heatmaps (each must be in --betas)")
    p.add_argument("--reference", choices=REFERENCE_MODES, default="sample",
                   help="compare the kept sets with headkv_vllm/reference.py's selection: 'sample' (default) on the "
                        "first prompt's first, middle and last layers, 'all' everywhere (its ranking takes about "
                        "0.1 s per head and setting), 'off'")
    p.add_argument("--out", default="results/diagnosis", help="output folder")
    args = p.parse_args(argv)
    try:
        args.needle_list = select_needles(args.needles)
        args.length_list = parse_ints(args.lengths, "--lengths", minimum=64)
        args.depth_list = [float(d) for d in parse_ints(args.depths, "--depths", minimum=0)]
        args.kv_size_list = parse_ints(args.kv_sizes, "--kv-sizes", minimum=2)
        args.window_list = parse_ints(args.windows, "--windows", minimum=1)
        args.pool_list = parse_ints(args.pool_kernels, "--pool-kernels", minimum=1)
        args.beta_list = parse_floats(args.betas, "--betas")
        args.heatmap_beta_list = parse_floats(args.heatmap_betas, "--heatmap-betas")
        args.method_list = parse_choices(args.methods, "--methods", METHODS)
        args.window_end_list = parse_choices(args.window_ends, "--window-ends", WINDOW_ENDS)
    except MethodError as e:
        p.error(str(e))
    if max(args.depth_list) > 100:
        p.error("--depths: percentages must be within 0..100.")
    if any(k % 2 == 0 or k > 63 for k in args.pool_list):
        p.error(f"--pool-kernels: kernels must be odd and 1-63 (the engine's bounds), got {args.pool_kernels!r}; "
                f"e.g. 7,1.")
    if max(args.window_list) >= min(args.kv_size_list):
        p.error(f"--windows: every window must be below every KV size (the window is part of the KV size); the "
                f"largest window is {max(args.window_list)} and the smallest --kv-sizes value "
                f"{min(args.kv_size_list)}. Lower the windows or raise the KV sizes.")
    if min(args.beta_list) <= 1:
        p.error(f"--betas: HeadKV's beta must be > 1 (e.g. 1.01,1.2,2), got {args.betas!r}.")
    missing = [b for b in args.heatmap_beta_list if b not in args.beta_list]
    if missing:
        p.error(f"--heatmap-betas: {', '.join(f'{b:g}' for b in missing)} not in --betas {args.betas!r}; "
                f"add them to --betas or drop them.")
    return args


def parse_floats(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MethodError(f"{option}: {text!r} is not a comma-separated list of numbers, e.g. 1.01,1.5.") from None
    if not values:
        raise MethodError(f"{option}: give at least one number, e.g. 1.01,1.5.")
    return values


def parse_choices(text: str, option: str, choices: tuple[str, ...]) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in choices]
    if bad or not names:
        raise MethodError(f"{option}: unknown value(s) {', '.join(bad) or '(none given)'}; use a comma-separated "
                          f"list of {', '.join(choices)}.")
    return list(dict.fromkeys(names))


def build_configs(args: argparse.Namespace) -> list[Config]:
    configs = []
    for method in args.method_list:
        betas = args.beta_list if POLICY_OF[method] == "headkv" else [None]
        configs += [Config(method, beta, kv, w, pool, end) for beta in betas for kv in args.kv_size_list
                    for w in args.window_list for pool in args.pool_list for end in args.window_end_list]
    return configs


def score_files(args: argparse.Namespace, model) -> dict[str, str]:
    """The score file of each headkv method, as eval-needle picks it."""
    files = {}
    for method, given in (("headkv-r", args.scores_r), ("headkv-r2", args.scores_r2)):
        if method not in args.method_list:
            continue
        path = given or find_probe_scores(model, "R" if method == "headkv-r" else "R2")
        if path is None:
            option = "--scores-r" if method == "headkv-r" else "--scores-r2"
            raise MethodError(f"--methods {method}: no score file for {model.name} in configs/; pass {option} FILE "
                              f"(made by `headkv-vllm score-heads`) or leave {method} out.")
        files[method] = str(path)
    return files


def budget_rules(configs: list[Config], files: dict[str, str], model) -> dict:
    """The engine's budget rule (``engine.settings.resolve_budgets``) of each configuration."""
    from headkv_vllm.engine.settings import resolve_budgets
    from headkv_vllm.method.config import HeadKVConfig, HeadKVConfigError

    rules = {}
    for c in configs:
        settings = {"kv_size": c.kv_size, "policy": POLICY_OF[c.method], "window": c.window,
                    "pool_kernel": c.pool_kernel}
        if c.method in files:
            settings["scores"] = files[c.method]
        if c.beta is not None:
            settings["beta"] = c.beta
        try:
            # As the engine reads them: window and beta set, so a score file's calibrated defaults do not apply.
            config = HeadKVConfig.from_mapping(settings, source="headkv-vllm diagnose-needle")
            rules[c] = resolve_budgets(config, model)[0]
        except HeadKVConfigError as e:
            raise MethodError(f"{c.name()}: {e}") from None
    return rules


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from headkv_vllm.tools.common.methods import model_identity

    try:
        model = model_identity(args.model)
        configs = build_configs(args)
        rules = budget_rules(configs, score_files(args, model), model)
    except MethodError as e:
        print(f"headkv-vllm diagnose-needle: error: {e}", file=sys.stderr)
        return 2
    command = "headkv-vllm diagnose-needle " + shlex.join(argv)
    return run(args, configs, rules, command)


def run(args: argparse.Namespace, configs: list[Config], rules: dict, command: str) -> int:
    import torch
    from transformers import AutoTokenizer

    from headkv_vllm.tools.diagnose import capture_qk
    from headkv_vllm.tools.diagnose.plots import heatmaps, summary_plot
    from headkv_vllm.tools.diagnose.prompt import build_prompt, window_info
    from headkv_vllm.tools.diagnose.select import REFERENCE_NOTE, ReferenceSelection, window_scores
    from headkv_vllm.tools.eval.needle_prompts import NeedlePrompts

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts_maker = NeedlePrompts(tokenizer)
    try:
        prompts = [build_prompt(prompts_maker, n, length, depth) for n in args.needle_list
                   for length in args.length_list for depth in args.depth_list]
    except ValueError as e:
        print(f"headkv-vllm diagnose-needle: error: {e}", file=sys.stderr)
        return 2
    reference_note = "skipped (--reference off)" if args.reference == "off" else REFERENCE_NOTE
    model = capture_qk.load_model(args.model)
    torch.set_grad_enabled(False)
    threads = torch.get_num_threads()
    max_window = max(args.window_list)
    per_config: dict[Config, list[dict]] = {c: [] for c in configs}
    settings = sorted({c.setting for c in configs})
    prompt_rows = []
    for i, prompt in enumerate(prompts):
        first_row = max(0, min(prompt.n, prompt.user_end) - max_window)
        torch.set_num_threads(threads)
        qk = capture_qk.capture(model, prompt.ids, first_row)
        # The scoring's small ops run faster on one thread than split over busy cores.
        torch.set_num_threads(1)
        layers = len(qk.k)
        checked = reference_layers(args.reference, i, layers)
        reference = ReferenceSelection(qk) if args.reference != "off" and checked else None
        windows = {}
        for window, pool, end_kind in settings:
            end = prompt.n if end_kind == "last" else prompt.user_end
            windows.setdefault(str(window), {})[end_kind] = window_info(tokenizer, prompt, window, end_kind)
            scores = [window_scores(qk, layer, end, window, pool) for layer in range(len(qk.k))]
            for c in (c for c in configs if c.setting == (window, pool, end_kind)):
                per_config[c].append(_evaluate(prompt, rules[c].kept(prompt.n), scores, c, end, reference, checked))
        prompt_rows.append(_prompt_record(prompt, windows))
        print(f"{prompt.needle.name}: {prompt.n} tokens, answer at {list(prompt.answer)}, "
              f"{time.monotonic() - started:.0f} s", file=sys.stderr)
    result = {"format": FORMAT, "command": command, "model": Path(args.model).name,
              "kept_needle_threshold": KEPT_NEEDLE,
              "reference": {"used": args.reference != "off", "mode": args.reference, "note": reference_note},
              "notes": ("Retention: share of the needle's answer tokens a KV head keeps. Budgets are the engine's kept "
                        "tokens per head (window included) for the prompt's length. 'user-text' windows end at the "
                        "user's last token; the template tokens after it are kept on top of the budget. A window's "
                        "template_tokens are its tokens after the user's text (the chat template, and a reasoning "
                        "needle's answer prefix); question_tokens those of the question's last occurrence. "
                        "question_retention: share of the question's last occurrence kept, mean over heads."),
              "prompts": prompt_rows,
              "configs": [_config_record(c, per_config[c], prompt_rows) for c in configs],
              "wall_s": None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result["wall_s"] = round(time.monotonic() - started, 1)
    json_path = out / "diagnosis.json"
    json_path.write_text(json.dumps(result, indent=1))
    pngs = heatmaps(result, out, args.heatmap_beta_list, args.pool_list[0]) + [summary_plot(result, out / "summary.png")]
    print(summary_text(result))
    print(f"wrote {json_path}, " + ", ".join(str(p) for p in pngs))
    return 0


def reference_layers(mode: str, prompt_index: int, num_layers: int) -> tuple[int, ...]:
    """Layers whose kept sets are compared with the reference, for the prompt_index-th prompt."""
    if mode == "all":
        return tuple(range(num_layers))
    if mode == "sample" and prompt_index == 0:
        return tuple(sorted({0, num_layers // 2, num_layers - 1}))
    return ()


def _evaluate(prompt, kept_table, scores, c: Config, end: int, reference, checked: tuple[int, ...]) -> dict:
    """One prompt under one configuration: retention per head, and whether the reference agrees on the
    ``checked`` layers."""
    from headkv_vllm.tools.diagnose.select import engine_kept, retention

    rows, question, mismatched, compared = [], [], 0, 0
    for layer, kept in enumerate(kept_table):
        sets = engine_kept(scores[layer], kept, c.window, prompt.n)
        rows.append([round(retention(s, prompt.answer), 4) for s in sets])
        question += [retention(s, prompt.question) for s in sets]
        if reference is not None and layer in checked:
            ref = reference.kept(layer, end, c.window, c.pool_kernel, kept, prompt.n)
            mismatched += sum(not (a.shape == b.shape and bool((a == b).all())) for a, b in zip(sets, ref))
            compared += len(sets)
    flat = [r for row in rows for r in row]
    return {"needle": prompt.needle.name, "length": prompt.length, "depth": prompt.depth,
            "budget": [list(k) for k in kept_table], "retention": rows,
            "mean_retention": round(sum(flat) / len(flat), 4),
            "heads_with_needle": sum(r >= KEPT_NEEDLE for r in flat),
            "question_retention": round(sum(question) / len(question), 4),
            "reference_compared_heads": compared, "reference_mismatched_heads": mismatched}


def _prompt_record(prompt, windows: dict) -> dict:
    return {"needle": prompt.needle.name, "length": prompt.length, "depth": prompt.depth, "tokens": prompt.n,
            "answer": prompt.needle.answer, "answer_positions": list(prompt.answer),
            "needle_positions": [prompt.needle_tokens[0], prompt.needle_tokens[-1]],
            "question_positions": [prompt.question[0], prompt.question[-1]],
            "user_end": prompt.user_end, "template_tail_tokens": prompt.n - prompt.user_end, "windows": windows}


def _config_record(c: Config, rows: list[dict], prompt_rows: list[dict]) -> dict:
    """Means over the prompts; per-head retention averaged over them, budgets of the first prompt."""
    heads = len(rows[0]["retention"][0])
    mean_grid = [[round(sum(r["retention"][l][h] for r in rows) / len(rows), 4) for h in range(heads)]
                 for l in range(len(rows[0]["retention"]))]
    compared = sum(r["reference_compared_heads"] for r in rows)
    mismatched = sum(r["reference_mismatched_heads"] for r in rows)
    return {**dataclasses.asdict(c), "label": LABELS[c.method],
            "mean_retention": round(sum(r["mean_retention"] for r in rows) / len(rows), 4),
            "heads_with_needle": round(sum(r["heads_with_needle"] for r in rows) / len(rows), 2),
            "heads": heads * len(mean_grid),
            "question_retention": round(sum(r["question_retention"] for r in rows) / len(rows), 4),
            "budget": rows[0]["budget"],
            "budget_same_for_all_prompts": all(r["budget"] == rows[0]["budget"] for r in rows),
            "retention": mean_grid,
            "reference_equal": None if compared == 0 else mismatched == 0,
            "reference_compared_heads": compared, "reference_mismatched_heads": mismatched,
            "per_prompt": [{**{k: v for k, v in r.items() if k != "budget"},
                            "window_text": p["windows"][str(c.window)][c.window_end]["text"]}
                           for r, p in zip(rows, prompt_rows)]}


def summary_text(result: dict) -> str:
    """Mean answer retention (heads keeping >= half the answer) per configuration, one table per pool / window end."""
    configs = result["configs"]
    lines = []
    for pool in sorted({c["pool_kernel"] for c in configs}, reverse=True):
        for end in WINDOW_ENDS:
            rows = [c for c in configs if c["pool_kernel"] == pool and c["window_end"] == end]
            if not rows:
                continue
            columns = list(dict.fromkeys((c["method"], c["beta"], c["kv_size"]) for c in rows))
            windows = sorted({c["window"] for c in rows})
            head = [f"{m}" + ("" if b is None else f" b{b:g}") + f" kv{kv}" for m, b, kv in columns]
            lines += [f"\npool {pool}, window end {end}: mean retention (heads >= {KEPT_NEEDLE:g} of the answer)",
                      "| window | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
            for w in windows:
                cells = []
                for m, b, kv in columns:
                    c = next(c for c in rows if (c["method"], c["beta"], c["kv_size"], c["window"]) == (m, b, kv, w))
                    cells.append(f"{c['mean_retention']:.3f} ({c['heads_with_needle']:g})")
                lines.append(f"| {w} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
