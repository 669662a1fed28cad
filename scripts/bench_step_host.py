"""Host time of HEADKV's attention metadata per engine step, for all layers.

vLLM calls the metadata builder of every KV-cache group each step, and under
HeadKV every layer is its own group. This drives the real builders of a source
tree (this one, and optionally an earlier one for "before") the way vLLM's model
runner does: one ``build()`` per layer per step, Llama-3-8B shapes (32 layers,
8 KV heads, head_dim 128, 16-token pages), 64 decoding requests with 1.8-2.2k-token
prompts, at two budgets (no compression: heads of ~2k tokens; KV size 128).

Routes:
- ``gpu``: the CUDA route's host work (before: the builder's slot tables; after:
  the step plan plus the block-table store's per-layer views). CPU tensors stand
  in for device tensors, so copies and syncs cost nothing here: on a GPU the
  "before" figure only grows.
- ``cpu``: the CPU engine's route (vLLM's CPU attention ops' page lists and work
  split), which is what runs on this machine.

    git worktree add ../headkv-before 8c7713f    # the last commit before the step plan
    python scripts/bench_step_host.py --before ../headkv-before --out results/step_host

Writes ``step_host.json`` and ``step_host.md`` to ``--out``. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, BLOCK = 32, 8, 32, 128, 16
REQUESTS, STEPS, WARMUP = 64, 20, 3
BUDGETS = {"no compression": 4096, "KV 128": 128}


def _modules(tree_is_new: bool):
    """The builder, spec and budget classes of the source tree on sys.path."""
    if tree_is_new:
        from headkv_vllm.engine import backend, kv_spec
        from headkv_vllm.method import budgets
    else:
        from headkv_vllm import backend, budgets, kv_spec
    return backend, kv_spec, budgets


def _runner(block_tables, held, prompts):
    """What the builders read of vLLM's model runner."""
    groups = [SimpleNamespace(layer_names=[f"model.layers.{l}.self_attn.attn"], kv_cache_spec=spec)
              for l, spec in enumerate(block_tables["specs"])]
    import numpy as np
    import torch

    tables = [SimpleNamespace(num_blocks_per_row=np.asarray(h, dtype=np.int32)) for h in held]
    batch = SimpleNamespace(
        num_prompt_tokens_cpu_tensor=torch.tensor(prompts), num_reqs=len(prompts),
        req_ids=[str(i) for i in range(len(prompts))], block_table=SimpleNamespace(block_tables=tables),
    )
    # the runner's request states: every request at the server's KV size (no vllm_xargs)
    requests = {r: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=None)) for r in batch.req_ids}
    return SimpleNamespace(input_batch=batch, kv_cache_config=SimpleNamespace(kv_cache_groups=groups), requests=requests)


def measure(route: str, kv_size: int) -> dict:
    """Runs in the subprocess whose PYTHONPATH holds the source tree to measure."""
    import torch

    from vllm.v1.attention.backend import CommonAttentionMetadata

    import headkv_vllm

    tree_is_new = (Path(headkv_vllm.__file__).parent / "core").is_dir()
    backend, kv_spec, budgets_mod = _modules(tree_is_new)
    torch.manual_seed(0)
    budgets = budgets_mod.Budgets(caps=tuple(tuple(row) for row in budgets_mod.snapkv_caps(LAYERS, KV_HEADS, kv_size, 8)),
                                  window=8)
    specs = [kv_spec.HeadKVSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.float32,
                                num_head_slots=1, layer_index=l, budgets=budgets) for l in range(LAYERS)]
    prompts = torch.randint(1800, 2201, (REQUESTS,)).tolist()
    model_config = SimpleNamespace(dtype=torch.float32, get_num_attention_heads=lambda parallel: Q_HEADS)
    vllm_config = SimpleNamespace(model_config=model_config, parallel_config=None, additional_config={})
    width = KV_HEADS * -(-4400 // BLOCK)
    generated = 10  # tokens decoded so far; grows by one per step
    total = [p + generated for p in prompts]

    def held_pages():
        return [[specs[l].pages_needed(p, t) for p, t in zip(prompts, total)] for l in range(LAYERS)]

    held = held_pages()
    tables = []
    next_block = 1
    for l in range(LAYERS):
        t = torch.zeros(REQUESTS, width, dtype=torch.int32)
        for r in range(REQUESTS):
            t[r, : held[l][r] + STEPS + WARMUP] = torch.arange(next_block, next_block + held[l][r] + STEPS + WARMUP)
            next_block += held[l][r] + STEPS + WARMUP
        tables.append(t)
    runner = _runner({"specs": specs}, held, prompts)

    builders = []
    for l, spec in enumerate(specs):
        names = runner.kv_cache_config.kv_cache_groups[l].layer_names
        b = backend.HeadKVMetadataBuilder(spec, names, vllm_config, torch.device("cpu"))
        builders.append(b)
    if tree_is_new:
        from headkv_vllm.core.page_store import BlockTablePageStore
        from headkv_vllm.engine.step_planner import StepPlanner

        planner = StepPlanner(budgets, BLOCK, torch.device("cpu"))
        planner.bind_runner(runner)
        # CPU tensors stand in for the device's; a tree from before the store took its device
        # chose the kernels per call, by the tensors
        takes_device = "device" in inspect.signature(BlockTablePageStore).parameters
        store = BlockTablePageStore(BLOCK, *(("cpu",) if takes_device else ())) if route == "gpu" \
            else backend.choose_page_store(vllm_config, specs[0], torch.device("cpu"))
        for b in builders:
            b.bind(planner, store)
    else:
        for b in builders:
            b.bind_runner(runner)
            if route == "gpu":
                b.cpu_isa = None  # the builder's CUDA branch (slot tables)

    times = []
    for step in range(WARMUP + STEPS):
        for r in range(REQUESTS):
            total[r] += 1
        held = held_pages()
        for l in range(LAYERS):
            runner.input_batch.block_table.block_tables[l].num_blocks_per_row[:] = held[l]
        qsl_cpu = torch.arange(REQUESTS + 1, dtype=torch.int32)  # a fresh view per step, as in vLLM
        seq = torch.tensor(total, dtype=torch.int32)
        base = dict(query_start_loc=qsl_cpu, query_start_loc_cpu=qsl_cpu, seq_lens=seq, num_reqs=REQUESTS,
                    num_actual_tokens=REQUESTS, max_query_len=1, max_seq_len=max(total),
                    slot_mapping=torch.zeros(REQUESTS, dtype=torch.long), seq_lens_cpu_upper_bound=seq)
        start = time.perf_counter()
        for l, b in enumerate(builders):
            b.build(0, CommonAttentionMetadata(block_table_tensor=tables[l], **base))
        if step >= WARMUP:
            times.append(time.perf_counter() - start)
    head_len = statistics.mean(min(k, p) + t - p for p, t in zip(prompts, total) for k in budgets.kept(p)[0])
    return {"ms_per_step_median": 1e3 * statistics.median(times), "ms_per_step_min": 1e3 * min(times),
            "ms_per_layer_median": 1e3 * statistics.median(times) / LAYERS, "mean_head_tokens": round(head_len, 1)}


def run_tree(tree: Path, route: str, kv_size: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, __file__, "--worker", json.dumps({"route": route, "kv_size": kv_size})]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    for line in out.stdout.splitlines():
        if line.startswith("STEP_HOST_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"measurement in {tree} failed:\n{out.stderr[-3000:]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="an earlier source tree (git worktree) to measure as 'before'")
    parser.add_argument("--out", type=Path, help="folder for step_host.json and step_host.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print("STEP_HOST_RESULT " + json.dumps(measure(spec["route"], spec["kv_size"])), flush=True)
        return 0
    trees = {"after": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    rows = []
    for route in ("gpu", "cpu"):
        for label, kv_size in BUDGETS.items():
            row = {"route": route, "budget": label, "kv_size": kv_size}
            for name, tree in trees.items():
                print(f"{route} route, {label}, {name} ...", flush=True)
                row[name] = run_tree(tree, route, kv_size)
            if "before" in row:
                row["speedup"] = row["before"]["ms_per_step_median"] / row["after"]["ms_per_step_median"]
            rows.append(row)
    sys.path.insert(0, str(ROOT))
    from headkv_vllm.tools.common.machine import machine_info

    before_commit = None
    if args.before:
        before_commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.before, capture_output=True,
                                       text=True).stdout.strip() or None
    result = {
        "command": " ".join([Path(sys.executable).name, "scripts/bench_step_host.py", *(argv or sys.argv[1:])]),
        "shape": {"layers": LAYERS, "kv_heads": KV_HEADS, "q_heads": Q_HEADS, "head_dim": HEAD_DIM,
                  "block_size": BLOCK, "requests": REQUESTS, "steps": STEPS},
        "before_commit": before_commit, "machine": machine_info(), "load_average": os.getloadavg(), "rows": rows,
    }
    lines = ["| route | budget | head tokens | before ms/step | after ms/step | after ms/layer | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r.get("before", {})
        lines.append(f"| {r['route']} | {r['budget']} | {r['after']['mean_head_tokens']} | "
                     f"{b.get('ms_per_step_median', float('nan')):.1f} | {r['after']['ms_per_step_median']:.1f} | "
                     f"{r['after']['ms_per_layer_median']:.2f} | "
                     f"{(str(round(r['speedup'], 1)) + 'x') if 'speedup' in r else '-'} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "step_host.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "step_host.md").write_text(f"Command: `{result['command']}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
