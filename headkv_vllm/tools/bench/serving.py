"""``headkv-vllm bench``: serving throughput, latency and memory of HEADKV against
stock vLLM, on the same machine, in one run, at the same KV cache size in bytes.

One ``vllm serve`` per configuration (stock, then the HEADKV method at each KV size),
each with ``--kv-cache-memory-bytes`` set to the same value. All requests (token-id
prompts cut from the haystack, fixed output length, greedy, EOS ignored) are
submitted together and streamed, so time to first token (TTFT) and inter-token
latency (ITL) are what a client sees. Peak concurrent running requests, KV cache
usage and preemptions are read from the server's Prometheus ``/metrics`` while it
works. Writes ``<name>.json``, ``<name>.md`` (the table) and ``<name>.png``.

    headkv-vllm bench --model models/SmolLM2-135M-Instruct --method headkv-r2 \\
        --num-requests 64 --prompt-tokens 2000:3000 --output-tokens 256 \\
        --kv-sizes 64,128,256,1024 --stock-fits 4 --name memory_bound
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from headkv_vllm.tools.common.methods import (FULL, METHODS, MethodError, build_methods, model_identity, parse_ints)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="headkv-vllm bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct", help="local model folder (served as is)")
    p.add_argument("--method", default="headkv-r2", help="HEADKV method: " + ", ".join(m for m in METHODS if m != FULL))
    p.add_argument("--kv-sizes", default="64,128,256,1024", help="average KV sizes (tokens per KV head) to run")
    p.add_argument("--no-stock", action="store_true", help="skip the stock vLLM run (ratios then are not computed)")
    p.add_argument("--num-requests", type=int, default=64, help="requests submitted together")
    p.add_argument("--prompt-tokens", default="2000:3000", help="MIN:MAX prompt length, uniform per request")
    p.add_argument("--output-tokens", type=int, default=256, help="tokens generated per request (EOS ignored)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--kv-cache-bytes", type=int, help="KV cache size in bytes for every server")
    size.add_argument("--stock-fits", type=float, default=4.0,
                      help="size the KV cache so stock vLLM holds this many average requests (default 4)")
    p.add_argument("--max-num-seqs", type=int, help="vLLM --max-num-seqs for every server (default: vLLM's)")
    p.add_argument("--one-step-too", action="store_true",
                   help="run each HEADKV config a second time with chunked prefill off (each prompt prefilled in "
                        "one step), to compare inter-token latency of running decodes while prompts arrive")
    p.add_argument("--vllm-args", default="",
                   help="more `vllm serve` options for every server, e.g. '--watermark 0.05' (recorded in the JSON)")
    p.add_argument("--scores-r", help="score file for headkv-r (default: the 'R' file for the model in configs/)")
    p.add_argument("--scores-r2", help="score file for headkv-r2 (default: the 'R2' file for the model in configs/)")
    p.add_argument("--headkv-settings", default="{}", help="JSON merged into every HEADKV config, e.g. '{\"beta\": 1.2}'")
    p.add_argument("--seed", type=int, default=0, help="workload seed (prompt lengths and haystack offsets)")
    p.add_argument("--name", default="bench", help="file stem of the outputs")
    p.add_argument("--out", default="results/bench", help="output folder")
    args = p.parse_args(argv)
    try:
        if args.method not in METHODS or args.method == FULL:
            raise MethodError(f"--method: {args.method!r} is not a HEADKV method; use one of "
                              f"{', '.join(m for m in METHODS if m != FULL)} (stock vLLM always runs unless --no-stock).")
        args.kv_size_list = parse_ints(args.kv_sizes, "--kv-sizes", minimum=9)
        lo, sep, hi = args.prompt_tokens.partition(":")
        args.prompt_range = (int(lo), int(hi or lo))
        args.settings = json.loads(args.headkv_settings)
    except json.JSONDecodeError as e:
        p.error(f"--headkv-settings is not valid JSON ({e}); pass e.g. '{{\"beta\": 1.2}}'.")
    except MethodError as e:
        p.error(str(e))
    except ValueError:
        p.error(f"--prompt-tokens: use MIN:MAX in tokens, e.g. 2000:3000; got {args.prompt_tokens!r}.")
    if not 16 <= args.prompt_range[0] <= args.prompt_range[1]:
        p.error(f"--prompt-tokens: need 16 <= MIN <= MAX, got {args.prompt_tokens!r}.")
    if args.num_requests < 1 or args.output_tokens < 1:
        p.error("--num-requests and --output-tokens must be >= 1.")
    if args.kv_cache_bytes is None and not args.stock_fits > 0:
        p.error("--stock-fits must be > 0 (or give --kv-cache-bytes).")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        model = model_identity(args.model)
        methods = build_methods([args.method], args.kv_size_list, model,
                                {"headkv-r": args.scores_r, "headkv-r2": args.scores_r2}, args.settings)
    except MethodError as e:
        print(f"headkv-vllm bench: error: {e}", file=sys.stderr)
        return 2
    if not args.no_stock:
        methods = build_methods([FULL], [], model, {}) + methods
    from headkv_vllm.tools.bench.measure import run_bench

    return run_bench(args, model, methods, "headkv-vllm bench " + shlex.join(argv))


if __name__ == "__main__":
    raise SystemExit(main())
