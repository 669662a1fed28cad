"""Resident memory of vLLM's CPU matrix multiply (oneDNN ``onednn_mm``, what vLLM's
CPU linear layers call) over many different token counts, under glibc's default
allocator settings and with a fixed mmap threshold; no engine, no HEADKV.

Explains the worker RSS growth that ``headkv-vllm stress`` measures under stock vLLM
and HEADKV alike (README, "Under load, client disconnects and bad requests").

    .venv/bin/python scripts/cpu_gemm_rss_probe.py --out results/stress/cpu_gemm_rss_probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

SETTINGS = {"glibc defaults": {}, "MALLOC_MMAP_THRESHOLD_=65536": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def probe(layers: int, rounds: int, per_round: int, seed: int) -> dict:
    """RSS (MiB) after each round of ``per_round`` multiplies with random token counts
    through ``layers`` handlers of SmolLM2's MLP shape, then after repeating one count."""
    import psutil
    import torch

    from vllm import _custom_ops as ops

    torch.set_num_threads(1)
    proc = psutil.Process()
    rss = lambda: round(proc.memory_info().rss / 2**20, 1)
    weight = torch.randn(1536, 576)
    handlers = [ops.create_onednn_mm(weight.t(), 32) for _ in range(layers)]  # cache size as vLLM's linear layers
    rng = random.Random(seed)
    out = {"start_mib": rss(), "after_round_mib": []}
    for _ in range(rounds):
        for _ in range(per_round):
            x = torch.randn(rng.randint(1, 2048), 576)
            for h in handlers:
                ops.onednn_mm(h, x, None)
        out["after_round_mib"].append(rss())
    before = rss()
    for _ in range(200):
        x = torch.randn(1000, 576)
        for h in handlers:
            ops.onednn_mm(h, x, None)
    out["one_count_repeated_mib"] = [before, rss()]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--per-round", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON file for both settings' results")
    p.add_argument("--one", action="store_true", help="run one probe in this process (the settings come from the environment)")
    args = p.parse_args()
    if args.one:
        print(json.dumps(probe(args.layers, args.rounds, args.per_round, args.seed)))
        return 0
    results = {}
    for name, env in SETTINGS.items():
        cmd = [sys.executable, __file__, "--one", "--layers", str(args.layers), "--rounds", str(args.rounds),
               "--per-round", str(args.per_round), "--seed", str(args.seed)]
        done = subprocess.run(cmd, env=dict(os.environ, **env), capture_output=True, text=True, check=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:>30}: {r['start_mib']:.0f} MiB at start, after each {args.per_round} multiplies: "
              f"{', '.join(f'{v:.0f}' for v in r['after_round_mib'])} MiB; one count repeated: "
              f"{r['one_count_repeated_mib'][0]:.0f} -> {r['one_count_repeated_mib'][1]:.0f} MiB")
    if args.out:
        from headkv_vllm.tools.common.machine import machine_info

        Path(args.out).write_text(json.dumps({"command": "scripts/cpu_gemm_rss_probe.py " + " ".join(sys.argv[1:]),
                                              "machine": machine_info(), "settings": vars(args),
                                              "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
