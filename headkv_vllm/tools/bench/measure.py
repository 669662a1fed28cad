"""The measurement behind ``headkv-vllm bench``: workload, one server per
configuration, streamed requests, server gauges, and the per-request KV bytes."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import time
from pathlib import Path

import httpx

from headkv_vllm.tools.common.methods import FULL, Method
from headkv_vllm.method.scores import ModelIdentity

FORMAT = "headkv-bench/1"
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
PREEMPTIONS = "vllm:num_preemptions_total"
DTYPE_BYTES = 4  # float32 on the CPU
POLL_S = 0.25
ONE_STEP_MIN_BUDGET = 2048  # vLLM's CPU server default for max_num_batched_tokens


def run_bench(args: argparse.Namespace, model: ModelIdentity, methods: list[Method], command: str) -> int:
    from transformers import AutoTokenizer

    from headkv_vllm.tools.eval.runs import portable
    from headkv_vllm.tools.common.machine import machine_info
    from headkv_vllm.tools.common.serve_process import stop_servers_on_sigterm

    stop_servers_on_sigterm()

    prompts = make_workload(AutoTokenizer.from_pretrained(args.model), args.num_requests, args.prompt_range, args.seed)
    kv_bytes = args.kv_cache_bytes or stock_kv_bytes_for(model, prompts, args.output_tokens, args.stock_fits)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "format": FORMAT, "command": command, "machine": machine_info(), "model": Path(args.model).name,
        "workload": {"num_requests": len(prompts), "prompt_tokens": list(args.prompt_range),
                     "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts), "output_tokens": args.output_tokens,
                     "seed": args.seed, "submitted": "all at once, streamed, greedy, EOS ignored"},
        "kv_cache_bytes": kv_bytes,
        "stock_requests_that_fit": kv_bytes / stock_request_bytes(model, prompts, args.output_tokens),
        "configs": [],
        "note": "load_average_mean: the machine's 1-minute load while a config ran; "
                f"{os.cpu_count()} cores, shared with other work, so timings of different configs can differ by it",
    }
    json_path = out / f"{args.name}.json"
    runs = [(m, False) for m in methods]
    if args.one_step_too:
        runs += [(m, True) for m in methods if m.headkv is not None]
    for method, one_step in runs:
        run = measure(method, prompts, kv_bytes, args, out, one_step)
        run["headkv"] = portable(method.headkv)
        run["served"] = method.served
        run["kv_bytes_per_request"] = kv_bytes_per_request(model, method, prompts, args.output_tokens)
        result["configs"].append(run)
        add_ratios(result["configs"])
        json_path.write_text(json.dumps(result, indent=1))
    from headkv_vllm.tools.common.plots import bench_plot, itl_plot

    table = bench_table(result)
    (out / f"{args.name}.md").write_text(table + "\n")
    png = bench_plot(result, out / f"{args.name}.png")
    itl_png = itl_plot(result, out / f"{args.name}_itl.png")
    print(table)
    print(f"wrote {json_path}, {out / f'{args.name}.md'}, {png}" + (f", {itl_png}" if itl_png else ""))
    return 0 if all("error" not in c for c in result["configs"]) else 1


def make_workload(tokenizer, n: int, prompt_range: tuple[int, int], seed: int) -> list[list[int]]:
    """Token-id prompts: haystack windows at random offsets (no shared prefixes)."""
    from headkv_vllm.tools.common.haystack import haystack_text

    haystack = tokenizer(haystack_text())["input_ids"]
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        length = rng.randint(*prompt_range)
        start = rng.randrange(0, len(haystack) - length)
        prompts.append(haystack[start : start + length])
    return prompts


def _stock_bytes_per_token(model: ModelIdentity) -> int:
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * DTYPE_BYTES


def stock_request_bytes(model: ModelIdentity, prompts: list[list[int]], output_tokens: int) -> float:
    """Mean KV bytes stock vLLM holds for a finished request: its tokens (the partly
    filled last block, at most one block size, is not counted)."""
    return sum(len(p) + output_tokens for p in prompts) / len(prompts) * _stock_bytes_per_token(model)


def stock_kv_bytes_for(model: ModelIdentity, prompts: list[list[int]], output_tokens: int, fits: float) -> int:
    return int(fits * stock_request_bytes(model, prompts, output_tokens))


def kv_bytes_per_request(model: ModelIdentity, method: Method, prompts: list[list[int]], output_tokens: int) -> float:
    """Mean KV bytes a finished request holds: stock blocks, or HEADKV head pages from the
    budgets and the page layout the scheduler allocates by (docs/kv_layout.md)."""
    if method.headkv is None:
        return stock_request_bytes(model, prompts, output_tokens)
    from headkv_vllm.method.config import HeadKVConfig
    from headkv_vllm.engine.settings import DEFAULT_BLOCK_SIZE as BLOCK_SIZE
    from headkv_vllm.engine.settings import resolve_budgets
    from headkv_vllm.method.layout import num_head_pages

    budgets, _ = resolve_budgets(HeadKVConfig.from_mapping(method.headkv), model)
    page_bytes = 2 * BLOCK_SIZE * model.head_dim * DTYPE_BYTES
    pages = [sum(num_head_pages(row, len(p), len(p) + output_tokens, BLOCK_SIZE) for row in budgets.kept(len(p)))
             for p in prompts]
    return sum(pages) / len(pages) * page_bytes


def measure(method: Method, prompts: list[list[int]], kv_bytes: int, args: argparse.Namespace, out: Path,
            one_step: bool = False) -> dict:
    """One server, the whole workload. ``one_step``: chunked prefill off (vLLM then needs a
    step's token budget of at least ``max_model_len``; ONE_STEP_MIN_BUDGET if larger)."""
    from headkv_vllm.tools.common.serve_process import GaugeWatcher, ServerConfig, ServerError, VllmServer

    label = "stock vLLM" if method.name == FULL else method.label
    max_len = -(-(args.prompt_range[1] + args.output_tokens + 16) // 64) * 64
    extra = server_args(args.vllm_args, max_len, one_step)
    label += " (one-step prefill)" if one_step else ""
    prefill = "one-step" if "--no-enable-chunked-prefill" in extra else "chunked"
    run = {"config": label, "method": method.name, "kv_size": method.kv_size, "prefill": prefill}
    config = ServerConfig(model=args.model, headkv=method.headkv, max_model_len=max_len, kv_cache_memory_bytes=kv_bytes,
                          max_num_seqs=args.max_num_seqs, extra_args=extra)
    slug = ("stock" if method.name == FULL else f"{method.name}_{method.kv_size}") + ("_one_step" if one_step else "")
    try:
        with VllmServer(config, out / "logs" / f"{args.name}_{slug}.log") as server:
            run["server"] = {"command": "vllm serve " + " ".join(server.command[2:]).replace(str(server.port), "PORT"),
                             "headkv_pool": server.headkv_pool(), "vllm_logged_kv_tokens": server.logged_kv_tokens()}
            asyncio.run(_warm_up(server.base_url, args.model))
            before = server.metrics().get(PREEMPTIONS, 0.0)
            with GaugeWatcher(server, GAUGES, POLL_S) as gauges:
                timings = asyncio.run(_drive(server.base_url, args.model, prompts, args.output_tokens, label))
            run["preemptions"] = server.metrics().get(PREEMPTIONS, 0.0) - before
            read = gauges.samples > 0  # no answered poll: the peaks are unknown, not zero
            run["peak_running"] = gauges.peak["vllm:num_requests_running"] if read else None
            run["peak_waiting"] = gauges.peak["vllm:num_requests_waiting"] if read else None
            run["peak_kv_cache_usage"] = gauges.peak["vllm:kv_cache_usage_perc"] if read else None
            run["gauge_samples"], run["gauge_failures"] = gauges.samples, gauges.failures
            if gauges.failures:
                run["gauge_last_error"] = gauges.last_error
                print(f"{label}: {gauges.failures} of {gauges.samples + gauges.failures} /metrics polls failed "
                      f"(last: {gauges.last_error})")
            run["load_average_mean"] = sum(gauges.load_averages) / max(1, len(gauges.load_averages))
    except (ServerError, httpx.HTTPError, OSError) as e:
        run["error"] = f"{type(e).__name__}: {e}"[-3000:]
        print(f"{label}: {run['error']}")
        return run
    run.update(latency_stats(timings))
    return run


def server_args(vllm_args: str, max_len: int, one_step: bool) -> tuple[str, ...]:
    extra = tuple(shlex.split(vllm_args))
    if one_step:
        extra += ("--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(max_len, ONE_STEP_MIN_BUDGET)))
    return extra


async def _warm_up(base_url: str, model: str) -> None:
    async with httpx.AsyncClient(timeout=600) as client:
        r = await client.post(f"{base_url}/v1/completions", json={
            "model": model, "prompt": "The first warm-up request.", "max_tokens": 4, "temperature": 0.0})
        r.raise_for_status()


async def _drive(base_url: str, model: str, prompts: list[list[int]], output_tokens: int, label: str) -> list[dict]:
    from tqdm import tqdm

    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        bar = tqdm(total=len(prompts), desc=f"{label:>18}", unit="req")

        async def one(prompt: list[int]) -> dict:
            body = {"model": model, "prompt": prompt, "max_tokens": output_tokens, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            sent, arrivals, tokens = time.perf_counter(), [], None
            async with client.stream("POST", f"{base_url}/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices"):
                        arrivals.append(time.perf_counter())
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            bar.update()
            return {"sent": sent, "arrivals": arrivals, "tokens": tokens, "prompt_tokens": len(prompt)}

        try:
            return await asyncio.gather(*[one(p) for p in prompts])
        finally:
            bar.close()


def _pct(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))] if ordered else None


def latency_stats(timings: list[dict]) -> dict:
    start = min(t["sent"] for t in timings)
    end = max(t["arrivals"][-1] for t in timings if t["arrivals"])
    duration = end - start
    ttft = [t["arrivals"][0] - t["sent"] for t in timings if t["arrivals"]]
    itl = [b - a for t in timings for a, b in zip(t["arrivals"], t["arrivals"][1:])]
    out_tokens = sum(t["tokens"] or 0 for t in timings)
    return {
        "duration_s": duration, "requests_per_s": len(timings) / duration, "output_tokens_per_s": out_tokens / duration,
        "total_tokens_per_s": (out_tokens + sum(t["prompt_tokens"] for t in timings)) / duration,
        "output_tokens": out_tokens, "ttft_mean_s": sum(ttft) / len(ttft), "ttft_p99_s": _pct(ttft, 99),
        "itl_mean_s": sum(itl) / len(itl) if itl else None, "itl_p99_s": _pct(itl, 99),
        "itl_p50_s": _pct(itl, 50), "itl_max_s": max(itl, default=None),
        # the distribution for the ITL plot: percentiles 0, 1, ..., 100
        "itl_percentiles_s": [_pct(itl, q) if q else min(itl) for q in range(101)] if itl else None,
        # decode stalls: inter-token gaps over 1 s, and their total
        "itl_stalls_over_1s": sum(g > 1.0 for g in itl), "itl_stall_time_s": sum(g for g in itl if g > 1.0),
    }


def add_ratios(configs: list[dict]) -> None:
    stock = next((c for c in configs if c["method"] == FULL and "error" not in c), None)
    for c in configs:
        if stock is None or "error" in c:
            continue
        c["output_tokens_per_s_x_stock"] = c["output_tokens_per_s"] / stock["output_tokens_per_s"]
        c["peak_running_x_stock"] = (c["peak_running"] / stock["peak_running"]
                                     if c["peak_running"] is not None and stock["peak_running"] else None)
        c["kv_bytes_per_request_x_stock"] = c["kv_bytes_per_request"] / stock["kv_bytes_per_request"]


def bench_table(result: dict) -> str:
    w = result["workload"]
    head = (f"{w['num_requests']} requests, prompts {w['prompt_tokens'][0]}-{w['prompt_tokens'][1]} tokens, "
            f"{w['output_tokens']} output tokens; KV cache {result['kv_cache_bytes'] / 2**20:.0f} MiB for every "
            f"server (stock fits {result['stock_requests_that_fit']:.1f} finished requests)\n\n")
    x = lambda v: "-" if v is None else f"{v:.2f}x"
    ms = lambda v: "-" if v is None else f"{1000 * v:.0f}"
    n = lambda v: "-" if v is None else f"{v:.0f}"
    lines = ["| config | req/s | output tok/s | x stock | TTFT mean / p99 (s) | ITL mean / p99 (ms) | "
             "peak running | x stock | preemptions | KV MiB / request | duration (s) | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["configs"]:
        if "error" in c:
            lines.append(f"| {c['config']} | failed: {c['error'][:80]} |" + " |" * 10)
            continue
        lines.append(
            f"| {c['config']} | {c['requests_per_s']:.3f} | {c['output_tokens_per_s']:.1f} | "
            f"{x(c.get('output_tokens_per_s_x_stock'))} | {c['ttft_mean_s']:.1f} / {c['ttft_p99_s']:.1f} | "
            f"{ms(c['itl_mean_s'])} / {ms(c['itl_p99_s'])} | {n(c['peak_running'])} | "
            f"{x(c.get('peak_running_x_stock'))} | {c['preemptions']:.0f} | {c['kv_bytes_per_request'] / 2**20:.1f} | "
            f"{c['duration_s']:.0f} | {c.get('load_average_mean', float('nan')):.1f} |")
    return head + "\n".join(lines)
