"""``headkv-vllm sched-sim``: the scheduler side of HEADKV at GPU scale, simulated on the CPU.

A head page is ``block_size`` tokens of ONE KV head of ONE layer, so a GPU's KV cache
holds hundreds of times more head pages than stock vLLM has blocks, and vLLM's block
pool keeps one Python object per block and allocates in Python. This command builds
vLLM's real ``Scheduler`` (with its ``KVCacheManager`` and ``BlockPool``) the way the
engine core does, from per-layer KV-cache specs and a KV-cache size in bytes, with no
model and no GPU, and steps it with fake model outputs (one sampled token per request
per step), for three setups at the same shapes and the same pool bytes:

- ``stock``: vLLM's defaults for a decoder LLM server: all layers in one KV-cache
  group (a block is 16 tokens of all KV heads of all layers), prefix caching on
  (prompts are hashed, full blocks cached), chunked prefill on.
- ``stock-plain``: stock blocks with the scheduler settings HEADKV runs with (prefix
  caching off, chunked prefill on): isolates what the block layout costs.
- ``headkv``: the plugin's setup (``--attention-backend headkv``, its engine settings
  applied by its config hook), one ``HeadKVSpec`` group per layer, ``HeadKVManager``;
  budgets: SnapKV-style uniform, KV size 128 (window 8) on every KV head.

Models (bf16, head_dim 128, block_size 16): Llama-3-8B (32 layers, 8 KV heads) on one
GPU, and Llama-3-70B (80 layers, 8 KV heads) as one rank of tensor parallelism 8 (its
bf16 weights do not fit one GPU): the scheduler sees one rank's KV cache, 1 KV head per
layer, and the rank's pool is the GPU's memory less 1/8 of the weights. KV-cache bytes
per GPU = ``gpu_mem * util - weights_per_gpu`` (no allowance for activations or CUDA
graphs, which would shrink both pools by the same few percent).

Each (model, setup) runs in a fresh process (clean host-memory numbers): build the
scheduler (timed; resident-memory delta), freeze the GC heap as vLLM's engine core does
after start-up, then for each request count: submit the requests (prompts of random
tokens, lengths uniform in ``--prompt-tokens``), step until every prompt is prefilled
("prefill" steps), then ``--decode-steps`` steps with every request decoding one token
("decode" steps), then abort all requests (pages back to the pool). Requests 1 and 3 of
every 4 ask for their own KV size (``--own-kv-sizes``, as a client's ``vllm_xargs``; HEADKV only).
Reported per step: ``schedule()`` and ``update_from_output()`` wall time, median and p90,
and the model runner's page tables: vLLM's V1 ``MultiGroupBlockTable`` fed each step's
scheduler output as the runner feeds it, the bytes its commit copies to the device and
the device memory the tables hold (``vllm_sim.RunnerTables``; no GPU needed).

    headkv-vllm sched-sim --out results/sched_sim
    headkv-vllm sched-sim --quick --out sched_sim_quick
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from headkv_vllm.method.layout import num_head_pages
from headkv_vllm.method.request_settings import KV_SIZE, request_kv_size

GB = 10**9
VARIANTS = ("stock", "stock-plain", "headkv")
WINDOW = 8


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    hf_name: str
    num_layers: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    num_params: float  # for the weights' bytes (bf16)
    tp: int  # tensor-parallel ranks; the scheduler sees one rank's KV cache

    @property
    def kv_heads_per_rank(self) -> int:
        return self.num_kv_heads // self.tp

    def weight_bytes_per_gpu(self) -> int:
        return int(self.num_params * 2 / self.tp)

    def hf_config(self) -> dict:
        # 131072 positions as Llama-3.1 (same shapes as Llama-3, longer RoPE range), so that
        # --max-model-len up to 131072 is accepted; the simulation runs no model.
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_query_heads, "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "vocab_size": 128256,
            "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128009,
        }


MODELS = {
    "llama3-8b": ModelShape("llama3-8b", "Meta-Llama-3-8B-Instruct", 32, 32, 8, 128, 4096, 14336, 8.03e9, tp=1),
    "llama3-70b": ModelShape("llama3-70b", "Meta-Llama-3-70B-Instruct", 80, 64, 8, 128, 8192, 28672, 70.55e9, tp=8),
}

FULL = dict(models="llama3-8b,llama3-70b", variants=",".join(VARIANTS), requests="64,256", decode_steps=50,
            prompt_tokens="1920:2176", max_model_len=4096, max_num_batched_tokens=8192, kv_bytes=None)
QUICK = dict(models="llama3-8b,llama3-70b", variants=",".join(VARIANTS), requests="4,8", decode_steps=6,
             prompt_tokens="200:300", max_model_len=1024, max_num_batched_tokens=1024, kv_bytes=512 * 2**20)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="headkv-vllm sched-sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny run: 512 MiB pool, 4 and 8 requests of 200-300 tokens, 6 decode steps, in one process")
    p.add_argument("--models", help=f"comma list of {', '.join(MODELS)} (default: both)")
    p.add_argument("--variants", help=f"comma list of {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--requests", help="comma list of running-request counts (default 64,256)")
    p.add_argument("--decode-steps", type=int, help="decode steps measured per request count (default 50)")
    p.add_argument("--prompt-tokens", help="MIN:MAX prompt length, uniform per request (default 1920:2176)")
    p.add_argument("--max-model-len", type=int, help="default 4096")
    p.add_argument("--max-num-batched-tokens", type=int, help="default 8192 (vLLM's for a large GPU)")
    p.add_argument("--max-num-seqs", type=int, help="default: the largest request count")
    p.add_argument("--gpu-mem-gb", type=float, default=141.0, help="GPU memory in GB (1e9 bytes; H200: 141)")
    p.add_argument("--gpu-util", type=float, default=0.9, help="vLLM --gpu-memory-utilization (default 0.9)")
    p.add_argument("--kv-bytes", type=int, help="KV-cache bytes per GPU, overriding the GPU-memory formula")
    p.add_argument("--pool-fraction", type=float, default=1.0,
                   help="build this fraction of the pool (memory safety); results say so (default 1.0)")
    p.add_argument("--kv-size", type=int, default=128, help="HEADKV uniform KV size per KV head (default 128)")
    p.add_argument("--own-kv-sizes", default="64,256",
                   help="KV sizes that requests 1 and 3 of every 4 ask for (HEADKV; default 64,256; '' for none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in-process", action="store_true",
                   help="run every (model, setup) in this process (default for --quick; memory numbers then overlap)")
    p.add_argument("--name", default="sched_sim", help="file stem of the outputs")
    p.add_argument("--out", default="results/sched_sim", help="output folder")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one (model, setup) run, spec as JSON
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.in_process = True
    args.model_list = _names(args.models, MODELS, "--models", p)
    args.variant_list = _names(args.variants, VARIANTS, "--variants", p)
    try:
        args.request_list = [int(x) for x in args.requests.split(",")]
        lo, _, hi = args.prompt_tokens.partition(":")
        args.prompt_range = (int(lo), int(hi or lo))
    except ValueError:
        p.error("--requests takes e.g. 64,256 and --prompt-tokens e.g. 1920:2176")
    if min(args.request_list) < 1 or args.decode_steps < 1 or args.prompt_range[0] <= WINDOW:
        p.error("request counts and --decode-steps must be >= 1, prompts longer than the window (8)")
    if args.prompt_range[1] + _max_generated(args) > args.max_model_len:
        p.error("--max-model-len is too small for the longest prompt plus the generated tokens")
    if args.max_num_seqs is None:
        args.max_num_seqs = max(args.request_list)
    if not 0 < args.pool_fraction <= 1:
        p.error("--pool-fraction must be in (0, 1]")
    try:
        args.own_kv_size_list = [int(x) for x in args.own_kv_sizes.split(",") if x.strip()]
    except ValueError:
        p.error("--own-kv-sizes takes e.g. 64,256")
    if len(args.own_kv_size_list) > 2 or any(k <= WINDOW for k in args.own_kv_size_list):
        p.error("--own-kv-sizes: at most two sizes, each larger than the window (8)")
    return args


def _names(text: str, allowed, flag: str, p) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in allowed]
    if bad or not names:
        p.error(f"{flag}: unknown {bad}; choose from {', '.join(allowed)}")
    return names


def _max_generated(args) -> int:
    # Requests decode during the prefill phase (at most one token per step) and the decode phase.
    longest_prefill_steps = -(-max(args.request_list) * args.prompt_range[1] // args.max_num_batched_tokens) + 2
    return longest_prefill_steps + args.decode_steps + 2


def kv_cache_bytes(shape: ModelShape, args) -> int:
    if args.kv_bytes is not None:
        full = args.kv_bytes
    else:
        full = int(args.gpu_mem_gb * GB * args.gpu_util) - shape.weight_bytes_per_gpu()
    return int(full * args.pool_fraction)


# ---------------------------------------------------------------------------
# One (model, setup): runs in its own process unless --in-process.
# ---------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _log(msg: str) -> None:
    print(f"[sched-sim {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _engine_args(shape: ModelShape, variant: str, model_dir: str, spec: dict) -> dict:
    common = dict(model=model_dir, skip_tokenizer_init=True, dtype="bfloat16", block_size=16,
                  max_model_len=spec["max_model_len"], max_num_seqs=spec["max_num_seqs"],
                  max_num_batched_tokens=spec["max_num_batched_tokens"], seed=spec["seed"])
    if variant == "stock":
        return dict(common, enable_prefix_caching=True, enable_chunked_prefill=True)
    if variant == "stock-plain":
        return dict(common, enable_prefix_caching=False, enable_chunked_prefill=True)
    return dict(common, attention_backend="headkv",
                additional_config={"headkv": {"policy": "snapkv", "kv_size": spec["kv_size"], "window": WINDOW}})


def _layer_specs(sim, shape: ModelShape, variant: str, kv_size: int, chunk_tokens: int) -> tuple[dict, object]:
    # In the measuring process only (see run_one).
    from headkv_vllm.engine.kv_spec import to_head_specs
    from headkv_vllm.method.budgets import BudgetRule
    from headkv_vllm.method.config import HeadKVConfig

    heads = shape.kv_heads_per_rank
    specs = sim.full_attention_specs(shape.num_layers, heads, shape.head_dim)
    if variant != "headkv":
        return specs, None
    config = HeadKVConfig.from_mapping({"policy": "snapkv", "kv_size": kv_size, "window": WINDOW})
    rule = BudgetRule.from_config(config, shape.num_layers, heads)
    budgets = rule.budgets(kv_size)
    return to_head_specs(specs, budgets, chunk_tokens, rule), budgets


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "median_ms": None, "p90_ms": None, "max_ms": None, "total_s": 0.0}
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"n": len(values), "median_ms": statistics.median(values) * 1e3, "p90_ms": p90 * 1e3,
            "max_ms": ordered[-1] * 1e3, "total_s": sum(values)}


def run_one(spec: dict) -> dict:
    """Build one scheduler and run every request count on it; returns the result record."""
    # vLLM and torch load in the process that measures, not in the parent that only starts it.
    import headkv_vllm
    from headkv_vllm.tools.sim import vllm_sim as sim

    shape = MODELS[spec["model"]]
    variant = spec["variant"]
    headkv_vllm.register()  # what vLLM's plugin loader does in every process
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / shape.hf_name
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(shape.hf_config()))
        vllm_config = sim.engine_config(**_engine_args(shape, variant, str(model_dir), spec))
    layer_specs, budgets = _layer_specs(sim, shape, variant, spec["kv_size"], spec["max_num_batched_tokens"])
    page = next(iter(layer_specs.values())).page_size_bytes
    pool_bytes = spec["kv_cache_bytes"]

    backend_cls = _backend_cls(sim, variant)
    t0 = time.perf_counter()
    kv_cache_config = sim.scheduler_kv_cache_config(vllm_config, layer_specs, pool_bytes, backend_cls)
    t_config = time.perf_counter() - t0
    num_blocks = kv_cache_config.num_blocks
    _log(f"{shape.name} {variant}: building the scheduler, {num_blocks:,} blocks in "
         f"{len(kv_cache_config.kv_cache_groups)} KV-cache group(s)")
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    scheduler = sim.build_scheduler(vllm_config, kv_cache_config)
    t_build = time.perf_counter() - t0
    rss1 = _rss_bytes()
    t0 = time.perf_counter()
    sim.freeze_gc_heap()
    t_freeze = time.perf_counter() - t0
    rss2 = _rss_bytes()
    _log(f"{shape.name} {variant}: built in {t_build:.1f} s (+{(rss1 - rss0) / 2**20:.0f} MiB resident), "
         f"GC heap frozen in {t_freeze:.1f} s")
    hasher = sim.request_block_hasher(vllm_config, scheduler)
    free0 = sim.num_free_blocks(scheduler)
    tables = sim.RunnerTables(vllm_config, kv_cache_config)

    record = {
        "model": shape.name, "variant": variant,
        "engine": {
            "enable_prefix_caching": vllm_config.cache_config.enable_prefix_caching,
            "enable_chunked_prefill": vllm_config.scheduler_config.enable_chunked_prefill,
            "max_num_batched_tokens": vllm_config.scheduler_config.max_num_batched_tokens,
            "max_num_seqs": vllm_config.scheduler_config.max_num_seqs,
            "max_model_len": vllm_config.model_config.max_model_len,
            "block_size": vllm_config.cache_config.block_size,
            "attention_backend": f"{backend_cls.__module__}.{backend_cls.__qualname__}",
            "kv_cache_layout": vllm_config.cache_config.kv_cache_layout,
            "scheduler_class": f"{type(scheduler).__module__}.{type(scheduler).__qualname__}",
            "kv_cache_manager_class": type(scheduler.kv_cache_manager.coordinator.single_type_managers[0]).__name__,
        },
        "pool": {
            "kv_cache_bytes": pool_bytes, "num_blocks": num_blocks, "block_bytes": page * _layers_per_block(kv_cache_config),
            "page_bytes_per_layer": page, "num_kv_cache_groups": len(kv_cache_config.kv_cache_groups),
            "kv_heads_per_layer": shape.kv_heads_per_rank, "free_blocks_at_start": free0,
            "kv_cache_config_s": t_config, "build_scheduler_s": t_build, "gc_freeze_s": t_freeze,
            "rss_delta_build_bytes": rss1 - rss0, "rss_delta_build_and_freeze_bytes": rss2 - rss0,
            "rss_after_build_bytes": rss2,
        },
        "page_tables": {"device_bytes": tables.device_bytes(), "host_bytes": tables.host_bytes(),
                        "tables": len(tables.table.block_tables),
                        "width": tables.table.block_tables[0].block_table.cpu.shape[1]},
        "runs": [],
    }
    if budgets is not None:
        record["budgets"] = {"policy": "snapkv (uniform)", "kv_size": spec["kv_size"], "window": WINDOW,
                             **budgets.summary()}
    for n in spec["requests"]:
        record["runs"].append(_run_requests(sim, scheduler, tables, hasher, shape, variant, layer_specs, n, spec,
                                            free0))
    gc.unfreeze()  # as the engine core does at shutdown; matters when several runs share a process
    return record


def _backend_cls(sim, variant: str):
    """The attention backend whose KV-cache layouts the engine core would resolve: the
    platform's dense backend for stock, the plugin's backend for HEADKV."""
    if variant != "headkv":
        return sim.dense_backend_cls()
    # In the measuring process only (see run_one).
    from headkv_vllm.engine.plugin import BACKEND_PATH

    return sim.backend_cls(BACKEND_PATH)


def _layers_per_block(kv_cache_config) -> int:
    """Layers one block id covers: all layers of the group for stock, one for HEADKV."""
    return len(kv_cache_config.kv_cache_groups[0].layer_names)


def _own_kv_size(variant: str, spec: dict, i: int) -> int | None:
    """The KV size request ``i`` asks for (None: the server's): requests 1 and 3 of every 4."""
    own = spec["own_kv_sizes"]
    if variant != "headkv" or not own or i % 2 == 0:
        return None
    return own[(i // 2) % len(own)]


def _run_requests(sim, scheduler, tables, hasher, shape, variant, layer_specs, n, spec, free0) -> dict:
    rng = random.Random(spec["seed"] * 1000 + n)
    lo, hi = spec["prompt_range"]
    prompts = [[rng.randrange(128000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    label = f"{shape.name} {variant} {n} requests"
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        own = _own_kv_size(variant, spec, i)
        scheduler.add_request(sim.make_request(f"r{n}-{i}", prompt, spec["max_tokens"], hasher,
                                               None if own is None else {KV_SIZE: own}))
    t_add = time.perf_counter() - t0

    phases = {k: {"schedule": [], "update": [], "tables": [], "h2d": []} for k in ("prefill", "decode")}
    tokens_per_step = {"prefill": [], "decode": []}
    steps = 0
    prefilled = False
    decode_steps = 0
    max_steps = _max_generated_steps(spec, n)
    while decode_steps < spec["decode_steps"]:
        if steps > max_steps:
            raise RuntimeError(f"{label}: not all requests decoding after {steps} steps "
                               f"({len(scheduler.running)} running, {len(scheduler.waiting)} waiting): is the KV cache "
                               f"({spec['kv_cache_bytes']:,} bytes) large enough for {n} requests?")
        phase = "decode" if prefilled else "prefill"
        t0 = time.perf_counter()
        out = scheduler.schedule()
        t1 = time.perf_counter()
        h2d = tables.step(out)
        phases[phase]["tables"].append(time.perf_counter() - t1)
        phases[phase]["h2d"].append(h2d)
        req_ids = list(out.num_scheduled_tokens)
        sampled = [[] if scheduler.requests[r].is_prefill_chunk else [1000 + steps % 1000] for r in req_ids]
        runner_output = sim.model_runner_output(req_ids, sampled)
        t2 = time.perf_counter()
        scheduler.update_from_output(out, runner_output)
        t3 = time.perf_counter()
        phases[phase]["schedule"].append(t1 - t0)
        phases[phase]["update"].append(t3 - t2)
        tokens_per_step[phase].append(out.total_num_scheduled_tokens)
        if phase == "decode":
            if out.total_num_scheduled_tokens != n or len(scheduler.running) != n:
                raise RuntimeError(f"{label}: decode step scheduled {out.total_num_scheduled_tokens} tokens "
                                   f"for {len(scheduler.running)} running requests, expected {n}")
            decode_steps += 1
        steps += 1
        if not prefilled:
            running = scheduler.running
            prefilled = len(running) == n and all(r.num_computed_tokens >= r.num_prompt_tokens for r in running)
            if prefilled:
                _log(f"{label}: all prompts prefilled after {steps} steps")
        if steps % 20 == 0:
            _log(f"{label}: step {steps}, {len(scheduler.running)} running, "
                 f"{'decode' if prefilled else 'prefill'} phase")

    running = scheduler.running
    free_end = sim.num_free_blocks(scheduler)
    held = free0 - free_end
    expected = _expected_blocks(variant, layer_specs, running)
    generated = [r.num_output_tokens for r in running]
    num_running = len(running)
    sim.finish_all_requests(scheduler)
    free_after = sim.num_free_blocks(scheduler)
    result = {
        "requests": n,
        "num_running": num_running,
        "num_waiting": len(scheduler.waiting),
        "prompt_tokens_mean": sum(map(len, prompts)) / n,
        "generated_tokens_min": min(generated), "generated_tokens_max": max(generated),
        "add_requests_s": t_add,
        "steps_total": steps,
        "prefill": {"steps": len(phases["prefill"]["schedule"]),
                    "tokens_per_step_mean": _mean(tokens_per_step["prefill"]),
                    "schedule": _quantiles(phases["prefill"]["schedule"]),
                    "update_from_output": _quantiles(phases["prefill"]["update"]),
                    "page_tables": _quantiles(phases["prefill"]["tables"]),
                    "page_table_h2d_bytes_max": max(phases["prefill"]["h2d"], default=0)},
        "decode": {"steps": len(phases["decode"]["schedule"]),
                   "schedule": _quantiles(phases["decode"]["schedule"]),
                   "update_from_output": _quantiles(phases["decode"]["update"]),
                   "schedule_plus_update": _quantiles([a + b for a, b in zip(phases["decode"]["schedule"],
                                                                             phases["decode"]["update"])]),
                   "page_tables": _quantiles(phases["decode"]["tables"]),
                   "page_table_h2d_bytes_mean": _mean(phases["decode"]["h2d"]),
                   "page_table_h2d_bytes_max": max(phases["decode"]["h2d"])},
        "blocks_held_at_end": held,
        "blocks_expected_at_end": expected,
        "blocks_held_per_request": held / n,
        "pool_usage_at_end": held / max(1, free0),
        "free_blocks_after_abort": free_after,
    }
    _log(f"{label}: decode schedule() median {result['decode']['schedule']['median_ms']:.2f} ms, "
         f"p90 {result['decode']['schedule']['p90_ms']:.2f} ms; {held:,} blocks held")
    return result


def _mean(values):
    return sum(values) / len(values) if values else None


def _max_generated_steps(spec, n) -> int:
    return -(-n * spec["prompt_range"][1] // spec["max_num_batched_tokens"]) + spec["decode_steps"] + n + 10


def _expected_blocks(variant, layer_specs, running) -> int:
    """What the pool should hold: stock ceil(len / 16) per request, HEADKV sum over layers and
    heads of ceil(len_h / 16) (docs/kv_layout.md), for the tokens whose KV is computed."""
    specs = list(layer_specs.values())
    total = 0
    for r in running:
        # KV exists for computed tokens; the scheduler also holds a slot for the token it will compute next.
        if variant == "headkv":
            n, kv_size = r.num_prompt_tokens, request_kv_size(r.sampling_params.extra_args)
            total += sum(num_head_pages(s.budgets_for(kv_size).kept(n)[s.layer_index], n, r.num_computed_tokens,
                                        s.block_size) for s in specs)
        else:
            total += -(-r.num_computed_tokens // specs[0].block_size)
    return total


# ---------------------------------------------------------------------------
# Orchestration and report.
# ---------------------------------------------------------------------------

def _spec(args, model: str, variant: str) -> dict:
    shape = MODELS[model]
    return {"model": model, "variant": variant, "requests": args.request_list, "decode_steps": args.decode_steps,
            "prompt_range": list(args.prompt_range), "max_model_len": args.max_model_len,
            "max_num_batched_tokens": args.max_num_batched_tokens, "max_num_seqs": args.max_num_seqs,
            "max_tokens": args.max_model_len - args.prompt_range[1], "kv_size": args.kv_size, "seed": args.seed,
            "own_kv_sizes": args.own_kv_size_list,
            "kv_cache_bytes": kv_cache_bytes(shape, args)}


def _run_isolated(spec: dict) -> dict:
    cmd = [sys.executable, "-m", "headkv_vllm.tools.sim.sched_sim", "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if proc.returncode != 0:
        raise RuntimeError(f"sched-sim worker for {spec['model']} {spec['variant']} failed (exit {proc.returncode})")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("SCHED_SIM_RESULT "))
    return json.loads(line.split(" ", 1)[1])


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def ratios(records: list[dict]) -> list[dict]:
    """HEADKV against each stock setup, same model and request count."""
    by_key = {(r["model"], r["variant"]): r for r in records}
    out = []
    for (model, variant), rec in by_key.items():
        if variant != "headkv":
            continue
        for base_name in ("stock", "stock-plain"):
            base = by_key.get((model, base_name))
            if base is None:
                continue
            row = {"model": model, "against": base_name,
                   "num_blocks": rec["pool"]["num_blocks"] / base["pool"]["num_blocks"],
                   "build_scheduler_s": _ratio(rec["pool"]["build_scheduler_s"], base["pool"]["build_scheduler_s"]),
                   "rss_delta_build": _ratio(rec["pool"]["rss_delta_build_bytes"], base["pool"]["rss_delta_build_bytes"]),
                   "page_table_device_bytes": _ratio(rec["page_tables"]["device_bytes"],
                                                     base["page_tables"]["device_bytes"]),
                   "per_requests": []}
            base_runs = {r["requests"]: r for r in base["runs"]}
            for run in rec["runs"]:
                b = base_runs.get(run["requests"])
                if b is None:
                    continue
                row["per_requests"].append({
                    "requests": run["requests"],
                    "prefill_schedule_median": _ratio(run["prefill"]["schedule"]["median_ms"], b["prefill"]["schedule"]["median_ms"]),
                    "prefill_schedule_total": _ratio(run["prefill"]["schedule"]["total_s"], b["prefill"]["schedule"]["total_s"]),
                    "decode_schedule_median": _ratio(run["decode"]["schedule"]["median_ms"], b["decode"]["schedule"]["median_ms"]),
                    "decode_schedule_p90": _ratio(run["decode"]["schedule"]["p90_ms"], b["decode"]["schedule"]["p90_ms"]),
                    "decode_update_median": _ratio(run["decode"]["update_from_output"]["median_ms"],
                                                   b["decode"]["update_from_output"]["median_ms"]),
                    "decode_page_table_h2d": _ratio(run["decode"]["page_table_h2d_bytes_mean"],
                                                    b["decode"]["page_table_h2d_bytes_mean"]),
                })
            out.append(row)
    return out


def _ratio(a, b):
    return None if not a or not b else a / b


def _fmt(x, digits=2):
    if x is None:
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}f}"


def markdown(result: dict) -> str:
    recs = result["records"]
    lines = [f"# Scheduler at GPU scale (simulation)", "",
             f"`{result['command']}`", "",
             f"Machine: {result['machine'].get('cpu')}, {result['machine'].get('cpu_cores_usable')} cores, "
             f"{result['machine'].get('ram_gib')} GiB RAM; load average {result['load_average_start']} at start, "
             f"{result['load_average_end']} at end; vLLM {result['machine']['versions'].get('vllm')}. "
             f"{result['assumptions']['pool']}", "",
             "Pool and start-up (one process per row):", "",
             "| model | setup | KV cache GB | blocks | bytes/block | groups | build scheduler s | GC freeze s | host memory MiB "
             "| page tables: device MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        p = r["pool"]
        lines.append(f"| {r['model']} | {r['variant']} | {p['kv_cache_bytes'] / GB:.1f} | {p['num_blocks']:,} | "
                     f"{p['block_bytes']:,} | {p['num_kv_cache_groups']} | {p['build_scheduler_s']:.2f} | "
                     f"{p['gc_freeze_s']:.2f} | {p['rss_delta_build_bytes'] / 2**20:.0f} | "
                     f"{r['page_tables']['device_bytes'] / 2**20:,.1f} |")
    lines += ["", "Steps (wall time per step, ms; prefill = every step until all prompts are prefilled, "
              "decode = every request decodes one token):", "",
              "| model | requests | setup | prefill steps | prefill schedule() median / p90 | "
              "decode schedule() median / p90 | decode update_from_output() median | "
              "decode page tables: H2D KiB/step, host ms | blocks held |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        for run in r["runs"]:
            pre, dec = run["prefill"], run["decode"]
            lines.append(
                f"| {r['model']} | {run['requests']} | {r['variant']} | {pre['steps']} | "
                f"{_fmt(pre['schedule']['median_ms'])} / {_fmt(pre['schedule']['p90_ms'])} | "
                f"{_fmt(dec['schedule']['median_ms'])} / {_fmt(dec['schedule']['p90_ms'])} | "
                f"{_fmt(dec['update_from_output']['median_ms'])} | "
                f"{dec['page_table_h2d_bytes_mean'] / 2**10:,.0f}, {_fmt(dec['page_tables']['median_ms'])} | "
                f"{run['blocks_held_at_end']:,} |")
    if result["ratios"]:
        lines += ["", "HEADKV / stock (ratios > 1: HEADKV slower or larger):", "",
                  "| model | against | blocks | build | host memory | table device memory | requests | "
                  "prefill schedule() total | decode schedule() median | decode schedule() p90 | decode update median "
                  "| decode table H2D |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in result["ratios"]:
            for pr in row["per_requests"]:
                lines.append(f"| {row['model']} | {row['against']} | {_fmt(row['num_blocks'], 0)} | "
                             f"{_fmt(row['build_scheduler_s'], 0)} | {_fmt(row['rss_delta_build'], 0)} | "
                             f"{_fmt(row['page_table_device_bytes'], 0)} | "
                             f"{pr['requests']} | {_fmt(pr['prefill_schedule_total'], 1)} | "
                             f"{_fmt(pr['decode_schedule_median'], 1)} | {_fmt(pr['decode_schedule_p90'], 1)} | "
                             f"{_fmt(pr['decode_update_median'], 1)} | {_fmt(pr['decode_page_table_h2d'], 0)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        record = run_one(json.loads(args.worker))
        record["pool"]["peak_rss_bytes"] = _peak_rss_bytes()
        print("SCHED_SIM_RESULT " + json.dumps(record), flush=True)
        return 0

    from headkv_vllm.tools.common.machine import machine_info

    load_start = [round(x, 2) for x in os.getloadavg()]
    command = "headkv-vllm sched-sim " + " ".join(shlex.quote(a) for a in argv)
    _log(f"{len(args.model_list)} model(s) x {len(args.variant_list)} setup(s), requests {args.request_list}, "
         f"{'in this process' if args.in_process else 'one process each'}")
    records = []
    t0 = time.perf_counter()
    for model in args.model_list:
        for variant in args.variant_list:
            spec = _spec(args, model, variant)
            records.append(run_one(spec) if args.in_process else _run_isolated(spec))
    shapes = {m: dataclasses.asdict(MODELS[m]) for m in args.model_list}
    result = {
        "command": command,
        "machine": machine_info(),
        "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "wall_s": time.perf_counter() - t0,
        "in_process": args.in_process,
        "settings": {k: getattr(args, k) for k in ("quick", "request_list", "decode_steps", "prompt_range",
                                                   "max_model_len", "max_num_batched_tokens", "max_num_seqs",
                                                   "gpu_mem_gb", "gpu_util", "kv_bytes", "pool_fraction",
                                                   "kv_size", "own_kv_size_list", "seed")},
        "models": shapes,
        "assumptions": {
            "pool": ("KV cache per GPU = GPU memory x utilisation - bf16 weights per GPU"
                     + (f" ({args.gpu_mem_gb:g} GB x {args.gpu_util:g}), no activation reserve"
                        if args.kv_bytes is None else f" (overridden: {args.kv_bytes} bytes)")
                     + (f", x {args.pool_fraction:g} (pool fraction)" if args.pool_fraction != 1 else "")
                     + "; llama3-70b as one rank of TP 8 (1 KV head per layer, 1/8 of the weights)."),
            "headkv_budgets": f"SnapKV-style uniform: every KV head keeps {args.kv_size} tokens "
                              f"({args.kv_size - WINDOW} chosen + window {WINDOW}) of a long prompt; requests 1 "
                              f"and 3 of every 4 ask for their own KV size ({args.own_kv_sizes or 'none'})",
            "model_outputs": "fake: one sampled token per request per step once its prompt is computed; "
                             "no model, no GPU; vLLM's engine-core GC freeze applied after start-up",
        },
        "records": records,
        "ratios": ratios(records),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result))
    _log(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.md')} in {result['wall_s']:.0f} s")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
