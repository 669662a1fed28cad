"""Time of a decode step through HeadKV's compute core (``headkv_vllm.core``) over all
layers: per layer the page store's ``layer_state`` and ``HeadAttention.forward``
(append each request's token to every head, attend over the head pages), as the
engine runs a decode-only step, plus the host time of the step's plan.

Llama-3-8B attention (32 query heads, 8 KV heads, head_dim 128, pages of 16 tokens), 4
layers, per-head budgets of the HeadKV policy on Pareto(1.2) head scores. The requests
are prefilled through the core first, so that the pages hold what HeadKV keeps. Each
row: ``requests`` prompts of ``prompt`` tokens, ``kv_size`` tokens kept per head on
average, one dtype.

On CUDA: the Triton kernels, CUDA events. On the CPU (``--quick`` only, the CPU dry run
of scripts/gpu_check.sh): the PyTorch references, wall clock; a smoke run of the
script, not a figure. Prints a table; ``--out`` writes the JSON. Never asserts
timings. The kernels alone against dense decode: scripts/bench_kernels.py.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from headkv_vllm.core.attention import HeadAttention, LayerStep
from headkv_vllm.core.page_store import BlockTablePageStore
from headkv_vllm.core.plan import KeptTable, StepInputs, build_step_plan
from headkv_vllm.method.budgets import Budgets, policy_budgets
from headkv_vllm.method.config import HeadKVConfig

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK, WINDOW, POOL_KERNEL = 4, 32, 8, 128, 16, 8, 7
# (requests, prompt tokens, KV size, dtype): large decode batches at two budgets, then a
# small batch, where launch latency shows, in each dtype.
ROWS = ((64, 2048, 128, "bfloat16"), (64, 2048, 1024, "bfloat16"), (8, 2048, 512, "bfloat16"),
        (8, 2048, 512, "float16"), (8, 2048, 512, "float32"))
QUICK_ROWS = ((4, 64, 16, "bfloat16"), (4, 64, 16, "float32"))
WARMUP = 3


def head_budgets(kv_size: int, seed: int) -> Budgets:
    """HeadKV budgets from Pareto(1.2) head scores: a few heads hold most tokens."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(LAYERS, KV_HEADS, generator=gen, dtype=torch.float64).clamp_min(1e-9) ** (-1 / 1.2)
    config = HeadKVConfig(kv_size=kv_size, policy="headkv", window=WINDOW, pool_kernel=POOL_KERNEL)
    return policy_budgets(config, LAYERS, KV_HEADS, scores.tolist())


def block_tables(kept: tuple[tuple[int, ...], ...], requests: int, prompt: int, device, gen: torch.Generator):
    """Per layer ``[requests, pages + 2]`` int32 block-table rows on distinct random pages,
    holding each head's tokens after one decoded token, then two null entries (vLLM's
    rows are wider than what they hold); and the pool's page count."""
    pages = [sum(-(-(min(k, prompt) + 1) // BLOCK) for k in heads) for heads in kept]  # per request, per layer
    num_blocks = 1 + requests * sum(pages)  # block 0 is the null block
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).int().split([requests * p for p in pages])
    return [torch.nn.functional.pad(t.view(requests, -1), (0, 2)).to(device) for t in ids], num_blocks


def step_inputs(requests: int, prompt: int, decode: bool) -> StepInputs:
    """Every request prefilling its prompt, or every request decoding its first token."""
    q = 1 if decode else prompt
    return StepInputs(query_start_loc=torch.arange(requests + 1, dtype=torch.int32) * q,
                      seq_lens=torch.full((requests,), prompt + int(decode)),
                      prompt_lens=torch.full((requests,), prompt), num_actual_tokens=requests * q)


def time_ms(fn, reps: int, device: torch.device) -> float:
    for _ in range(WARMUP):
        fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1e3 * (time.perf_counter() - t0) / reps
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def bench_row(requests: int, prompt: int, kv_size: int, dtype: str, device: torch.device, reps: int,
              seed: int = 0) -> dict:
    """Prefill ``requests`` prompts through the core, then time their decode step (the
    same token rewritten at the same position each repetition)."""
    budgets = head_budgets(kv_size, seed)
    gen, device_gen = torch.Generator().manual_seed(seed), torch.Generator(device).manual_seed(seed)
    kept = budgets.kept(prompt)
    tables, num_blocks = block_tables(kept, requests, prompt, device, gen)
    store = BlockTablePageStore(BLOCK, device)
    attention = HeadAttention(Q_HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM ** -0.5, POOL_KERNEL)
    pages = torch.zeros(num_blocks, 2, BLOCK, HEAD_DIM, dtype=getattr(torch, dtype), device=device)
    kept_table = KeptTable(budgets)

    def prepare(decode: bool):
        """The layers of the step on fresh random q/k/v, as one closure; the plan's host time."""
        inputs = step_inputs(requests, prompt, decode)
        t0 = time.perf_counter()
        plan = build_step_plan(inputs, kept_table, BLOCK, device, pin_memory=device.type == "cuda")
        plan_ms = 1e3 * (time.perf_counter() - t0)
        qkv = [torch.randn(inputs.num_actual_tokens, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=device_gen,
                           device=device, dtype=pages.dtype)
               .split([Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=1) for _ in range(LAYERS)]
        out = torch.empty(inputs.num_actual_tokens, Q_HEADS * HEAD_DIM, dtype=pages.dtype, device=device)

        def run():
            for layer, (q, k, v) in enumerate(qkv):
                state = store.layer_state(plan, layer, tables[layer])
                attention.forward(LayerStep(plan, layer, store, state), q, k, v, pages, out)
        return run, plan_ms

    prepare(decode=False)[0]()  # the prefill: pages hold what each head keeps
    decode_step, plan_ms = prepare(decode=True)
    ms = time_ms(decode_step, reps, device)
    held = torch.tensor(kept).clamp(max=prompt).float() + 1  # [L, Hkv] tokens per head after the decode
    return {"requests": requests, "prompt": prompt, "kv_size": kv_size, "dtype": dtype, "layers": LAYERS,
            "ms_per_step": round(ms, 4), "ms_per_layer": round(ms / LAYERS, 4), "plan_ms": round(plan_ms, 3),
            "head_tokens_mean": round(float(held.mean()), 1), "head_tokens_max": int(held.max()), "reps": reps}


def print_table(rows: list[dict]) -> None:
    print(f"{'requests':>8} {'prompt':>6} {'kv':>5} {'dtype':>9} {'ms/step':>9} {'ms/layer':>9} {'head tokens':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['requests']:>8} {r['prompt']:>6} {r['kv_size']:>5} {r['dtype']:>9}  {r['error']}")
            continue
        print(f"{r['requests']:>8} {r['prompt']:>6} {r['kv_size']:>5} {r['dtype']:>9} {r['ms_per_step']:>9.3f} "
              f"{r['ms_per_layer']:>9.3f} {r['head_tokens_mean']:>11.1f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--quick", action="store_true", help="small batches and prompts: a smoke run in seconds")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.quick:
        print("bench_decode_step.py: no CUDA device; on the CPU only --quick runs (a smoke run)", file=sys.stderr)
        return 2
    rows = []
    for requests, prompt, kv_size, dtype in QUICK_ROWS if args.quick else ROWS:
        try:
            row = bench_row(requests, prompt, kv_size, dtype, device, args.reps)
        except torch.OutOfMemoryError as e:
            row = {"requests": requests, "prompt": prompt, "kv_size": kv_size, "dtype": dtype,
                   "error": f"out of memory: {str(e).splitlines()[0]}"}
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.out:  # the file's name only: no machine paths in the result
        argv = [args.out.name if a == str(args.out) else a for a in argv]
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "kernels": "triton" if device.type == "cuda" else "reference", "torch": torch.__version__,
              "command": shlex.join(["python", "scripts/bench_decode_step.py", *argv]),
              "shapes": {"layers": LAYERS, "num_heads": Q_HEADS, "num_kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                         "block_size": BLOCK, "window": WINDOW, "pool_kernel": POOL_KERNEL},
              "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
