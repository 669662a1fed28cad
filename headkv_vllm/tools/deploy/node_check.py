"""``headkv-vllm node-check``: one stage of the staged check of HEADKV on a serving
node (``scripts/gpu_node_check.sh`` runs the three stages in the Docker image).

Each stage starts, one after another, real ``vllm serve`` processes of the model:

1. stock vLLM (``--attention-backend`` the platform's dense backend: TRITON_ATTN on
   CUDA) -- the reference;
2. HEADKV with every head's budget at least the longest prompt (nothing evicted):
   its greedy tokens must equal stock vLLM's up to the first near-tie of stock's top
   two tokens (a logprob margin under ``--tie-margin``; 0 in float32: all tokens),
   since HEADKV and stock run different attention kernels;
3. HEADKV compressed (the default policy, ``kv_size`` 128): every request must
   complete.

Stages differ in how the engine starts, the order in which the CUDA start-up paths
are risked:

- ``eager``: ``--enforce-eager`` and a fixed KV-cache size (no graphs, no profiling);
- ``graphs``: vLLM's default compilation and CUDA graphs (piecewise around HEADKV
  attention), fixed KV-cache size;
- ``profiled``: graphs and vLLM's own memory profiling (``--gpu-memory-utilization``;
  the CUDA-graph memory profile builds its own KV cache).

On CUDA the HEADKV servers' logs must also show what the stage is about: vLLM
choosing Model Runner V1 for HEADKV; from ``graphs`` on, piecewise CUDA graphs
resolved for HEADKV and captured; in ``profiled``, the CUDA-graph memory profile.

Writes ``node_check_<stage>.json`` (machine, commands, outputs, verdicts) and prints
what the stage proved. Exit code 0 only when every check of the stage held.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx

from headkv_vllm.tools.common.machine import machine_info
from headkv_vllm.tools.common.serve_process import ServerConfig, ServerError, VllmServer, stop_servers_on_sigterm

STAGES = ("eager", "graphs", "profiled")
MAX_TOKENS = 32

# Fixed prompts: short chat-like ones and a long one (~1.5k tokens) whose answer sits
# early in the context, so that compression has something to evict.
_FACTS = "".join(f"Record {i}: the locker of employee {i * 37 % 1000} holds {i * 13 % 97} blue boxes.\n"
                 for i in range(1, 90))
PROMPTS = (
    "The capital of France is",
    "Write one sentence about the sea:",
    "List three prime numbers greater than ten:",
    _FACTS + "Question: how many blue boxes does the locker of employee 37 hold? Answer:",
)


def stage_servers(stage: str, model: str, dtype: str, max_model_len: int, kv_cache_bytes: int,
                  memory_utilization: float, stock_backend: str) -> list[tuple[str, ServerConfig]]:
    """The three servers of a stage, in the order they run."""
    sizing = dict(kv_cache_memory_bytes=None if stage == "profiled" else kv_cache_bytes,
                  gpu_memory_utilization=memory_utilization, enforce_eager=stage == "eager")
    base = dict(model=model, dtype=dtype, max_model_len=max_model_len, **sizing)
    return [
        ("stock", ServerConfig(**base, extra_args=("--attention-backend", stock_backend))),
        ("headkv_uncompressed", ServerConfig(**base, headkv={"policy": "snapkv", "kv_size": max_model_len})),
        ("headkv_compressed", ServerConfig(**base, headkv={"kv_size": 128})),
    ]


def complete(server: VllmServer, model: str, prompt: str) -> dict:
    r = httpx.post(f"{server.base_url}/v1/completions", timeout=600, json={
        "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
        "ignore_eos": True, "logprobs": 2,
    })
    r.raise_for_status()
    choice = r.json()["choices"][0]
    ranked = [sorted(t.values(), reverse=True) for t in choice["logprobs"]["top_logprobs"]]
    margins = [r[0] - r[1] if len(r) > 1 else None for r in ranked]
    return {"text": choice["text"], "tokens": choice["logprobs"]["tokens"], "margins": margins,
            "finish_reason": choice["finish_reason"]}


def compared_length(stock: dict, tie_margin: float) -> int:
    """Positions before stock's first near-tie (top-1 minus top-2 logprob below
    ``tie_margin``): the tied token may go either way, so may everything after it."""
    for i, m in enumerate(stock["margins"]):
        if m is not None and m < tie_margin:
            return i
    return len(stock["tokens"])


# (stage it applies from, what the log must contain, what it shows); CUDA only.
LOG_EVIDENCE = (
    ("eager", "HEADKV attention backend", "vLLM chose Model Runner V1 for HEADKV"),
    ("graphs", "setting cudagraph_mode=PIECEWISE", "piecewise CUDA graphs resolved for HEADKV"),
    ("graphs", "Graph capturing finished", "CUDA graphs captured"),
    ("profiled", "Profiling CUDA graph memory", "the CUDA-graph memory profile ran (its own KV cache)"),
)


def log_checks(stage: str, name: str, log: str) -> list[dict]:
    out = [{"check": f"{name}: HEADKV backend and budgets in the log", "passed":
            "Using HEADKV backend" in log and "HeadKV: policy=" in log, "detail": ""}]
    if "device_config=cuda" in log:
        for since, text, shows in LOG_EVIDENCE:
            if STAGES.index(stage) >= STAGES.index(since):
                out.append({"check": f"{name}: {shows}", "passed": text in log, "detail": f"log line '{text}'"})
    return out


def run_stage(args) -> dict:
    result = {"stage": args.stage, "model": args.model, "dtype": args.dtype, "machine": machine_info(), "servers": {}}
    servers = stage_servers(args.stage, args.model, args.dtype, args.max_model_len, args.kv_cache_bytes,
                            args.gpu_memory_utilization, args.stock_backend)
    for name, config in servers:
        entry = result["servers"][name] = {"command": " ".join(config.command(0)).replace("--port 0", "--port PORT")}
        log = Path(args.out) / f"node_check_{args.stage}_{name}.log"
        try:
            with VllmServer(config, log) as server:
                entry["outputs"] = [complete(server, args.model, p) for p in PROMPTS]
                entry["headkv_pool"] = server.headkv_pool()
                if config.headkv is not None:
                    entry["log_checks"] = log_checks(args.stage, name, server.log_text())
        except (ServerError, httpx.HTTPError) as e:
            entry["error"] = f"{type(e).__name__}: {e}"[:4000]
    tie_margin = args.tie_margin if args.tie_margin is not None else (0.0 if args.dtype == "float32" else 0.05)
    result["tie_margin"] = tie_margin
    result["checks"] = checks(result["servers"], tie_margin)
    result["passed"] = all(c["passed"] for c in result["checks"])
    return result


def checks(servers: dict, tie_margin: float = 0.0) -> list[dict]:
    """The stage's verdicts, each with what it proves."""
    out = []
    for name in servers:
        out.append({"check": f"{name} started and answered", "passed": "outputs" in servers[name],
                    "detail": servers[name].get("error", "")[:300]})
        out += servers[name].get("log_checks", [])
    stock, full, comp = (servers[n].get("outputs") for n in ("stock", "headkv_uncompressed", "headkv_compressed"))
    if stock and full:
        lengths = [compared_length(s, tie_margin) for s in stock]
        same = [a["tokens"][:n] == b["tokens"][:n] for a, b, n in zip(stock, full, lengths)]
        whole = sum(a["tokens"] == b["tokens"] for a, b in zip(stock, full))
        out.append({"check": "HEADKV with budgets >= prompt gives stock vLLM's greedy tokens", "passed": all(same),
                    "detail": f"{sum(same)}/{len(same)} prompts equal over {sum(lengths)}/{MAX_TOKENS * len(stock)} "
                              f"tokens compared (up to stock's first near-tie); {whole} equal in full"})
    if comp:
        done = [len(o["tokens"]) == MAX_TOKENS for o in comp]
        out.append({"check": "compressed HEADKV completes every request", "passed": all(done),
                    "detail": f"{sum(done)}/{len(done)} completed"})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="headkv-vllm node-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--model", required=True, help="HF model id or local model folder")
    p.add_argument("--dtype", default="bfloat16", help="model dtype for every server (default: bfloat16)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--kv-cache-bytes", type=int, default=4 * 2**30,
                   help="KV-cache size of the 'eager' and 'graphs' stages (default: 4 GiB)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                   help="the 'profiled' stage's memory fraction (servers run one at a time)")
    p.add_argument("--stock-backend", default="TRITON_ATTN", help="stock vLLM's attention backend (default: TRITON_ATTN)")
    p.add_argument("--tie-margin", type=float, default=None,
                   help="compare greedy tokens up to stock's first top-1/top-2 logprob margin below this "
                        "(default: 0 for float32, i.e. every token; 0.05 otherwise)")
    p.add_argument("--out", default="results/node_check", help="folder for the JSON result and server logs")
    args = p.parse_args(argv)
    stop_servers_on_sigterm()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result = run_stage(args)
    path = Path(args.out) / f"node_check_{args.stage}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"node-check stage '{args.stage}' ({args.model}, {args.dtype}): {'PASSED' if result['passed'] else 'FAILED'}")
    for c in result["checks"]:
        print(f"  [{'ok' if c['passed'] else 'FAIL'}] {c['check']}" + (f" ({c['detail']})" if c["detail"] else ""))
    print(f"  result: {path}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
