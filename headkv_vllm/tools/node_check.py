"""``headkv-vllm node-check``: one stage of the staged check of HEADKV on a serving
node (``scripts/gpu_node_check.sh`` runs the three stages in the Docker image).

Each stage starts, one after another, real ``vllm serve`` processes of the model:

1. stock vLLM (``--attention-backend`` the platform's dense backend: TRITON_ATTN on
   CUDA) -- the reference;
2. HEADKV with every head's budget at least the longest prompt (nothing evicted):
   its greedy completions must equal stock vLLM's;
3. HEADKV compressed (the default policy, ``kv_size`` 128): every request must
   complete.

Stages differ in how the engine starts, the order in which the CUDA start-up paths
are risked:

- ``eager``: ``--enforce-eager`` and a fixed KV-cache size (no graphs, no profiling);
- ``graphs``: vLLM's default compilation and CUDA graphs (piecewise around HEADKV
  attention), fixed KV-cache size;
- ``profiled``: graphs and vLLM's own memory profiling (``--gpu-memory-utilization``;
  the CUDA-graph memory profile builds its own KV cache).

Writes ``node_check_<stage>.json`` (machine, commands, outputs, verdicts) and prints
what the stage proved. Exit code 0 only when every check of the stage held.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx

from headkv_vllm.tools.machine import machine_info
from headkv_vllm.tools.serve_process import ServerConfig, ServerError, VllmServer, stop_servers_on_sigterm

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
        "ignore_eos": True, "logprobs": 1,
    })
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return {"text": choice["text"], "tokens": choice["logprobs"]["tokens"], "finish_reason": choice["finish_reason"]}


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
        except (ServerError, httpx.HTTPError) as e:
            entry["error"] = f"{type(e).__name__}: {e}"[:4000]
    result["checks"] = checks(result["servers"])
    result["passed"] = all(c["passed"] for c in result["checks"])
    return result


def checks(servers: dict) -> list[dict]:
    """The stage's verdicts, each with what it proves."""
    out = []
    for name in servers:
        out.append({"check": f"{name} started and answered", "passed": "outputs" in servers[name],
                    "detail": servers[name].get("error", "")[:300]})
    stock, full, comp = (servers[n].get("outputs") for n in ("stock", "headkv_uncompressed", "headkv_compressed"))
    if stock and full:
        same = [a["tokens"] == b["tokens"] for a, b in zip(stock, full)]
        out.append({"check": "HEADKV with budgets >= prompt gives stock vLLM's greedy tokens", "passed": all(same),
                    "detail": f"{sum(same)}/{len(same)} prompts equal"})
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
