"""Compile every HeadKV Triton kernel, as its launcher would launch it, for CUDA
targets on a machine without a GPU (Triton + its bundled ptxas only).

The interpreter tests check what the kernels compute; this checks that the same
kernels also get through Triton's GPU compiler (typing, constexpr branches,
layouts), which the interpreter never runs: each launcher runs on small CPU
tensors with its kernels replaced by recorders, then every recorded launch is
compiled with the argument specialisation a real launch would get. Run without
TRITON_INTERPRET. Prints ``COMPILED <kernel names>`` on success.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from headkv_vllm.kernels import (
    append_decode_kv, dense_paged_decode, paged_decode, paged_decode_block_table, select_store, split_k_decode,
    window_scores,
)

MODULES = [window_scores, select_store, split_k_decode, append_decode_kv]


class Recorder:
    """Stands in for a kernel: records each launch's arguments instead of running it."""

    def __init__(self, fn: JITFunction):
        self.fn, self.launches = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def record_launches(dtypes):
    recorders, originals = {}, []
    for module in MODULES:
        for name, obj in list(vars(module).items()):
            if isinstance(obj, JITFunction) and name.startswith("_"):
                recorders[name] = Recorder(obj)
                originals.append((module, name, obj))
                setattr(module, name, recorders[name])
        for name, stub in (("require_launchable", lambda *a: None),
                           ("upcast_dot", lambda kernel, dtype: dtype == torch.float32)):  # as on a GPU
            if hasattr(module, name):
                originals.append((module, name, getattr(module, name)))
                setattr(module, name, stub)
    try:
        launch_all(dtypes)
    finally:  # the compiler reads the kernels' globals: put the real ones back
        for module, name, obj in originals:
            setattr(module, name, obj)
    return recorders


def launch_all(dtypes):
    for dtype in dtypes:
        for group, d in ((4, 128), (3, 64), (1, 128)):
            hkv = 8 if group != 3 else 3
            q = torch.zeros(8, group * hkv, d, dtype=dtype)
            k = torch.zeros(40, hkv, d, dtype=dtype)
            window_scores.window_scores_triton(q, k, 0.1, 7)
            pages = torch.zeros(16, 2, 16, d, dtype=dtype)
            caps = torch.zeros(hkv, dtype=torch.long)
            select_store.select_and_store_triton(torch.zeros(hkv, 32), k, k, caps, caps + 8,
                                                 torch.zeros(hkv, 40, dtype=torch.long), pages)
            for batch, lmax in ((1, 4096), (64, 16)):  # split-K and one split
                qd = torch.zeros(batch, group * hkv, d, dtype=dtype)
                lens = torch.ones(batch, hkv, dtype=torch.long)
                table = torch.zeros(batch, lmax, dtype=torch.int32)
                paged_decode.paged_decode_triton(qd, pages, torch.zeros(batch, hkv, lmax, dtype=torch.long), lens, 0.1)
                paged_decode_block_table.paged_decode_block_table_triton(qd, pages, table, lens, lens, 0.1)
                dense_paged_decode.dense_paged_decode_triton(
                    qd, torch.zeros(2, 16, 16, hkv, d, dtype=dtype), table, lens[:, 0].contiguous(), 0.1)
            append_decode_kv.append_decode_kv_triton(k[:2], k[:2], pages, torch.zeros(2, 4, dtype=torch.int32),
                                                     caps[None].expand(2, -1), caps[None].expand(2, -1) + 1)


def compile_launch(fn: JITFunction, args, kwargs, target):
    """Compile as ``fn[grid](*args, **kwargs)`` would on ``target``: same argument
    specialisation (ints equal to 1, 16-divisible ints and pointers), same options."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    key = (fn.__name__, target.arch, str(specialization), str(options))
    return key, lambda: triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                       options=options.__dict__)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="CUDA compute capabilities, e.g. 80 90")
    parser.add_argument("--cubin-dir", help="also write each cubin here (inspect registers and spills with "
                                            "cuobjdump --dump-resource-usage)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET", file=sys.stderr)
        return 2
    compiled, seen = set(), set()
    for name, rec in record_launches((torch.bfloat16, torch.float32)).items():
        for launch_args, kwargs in rec.launches:  # jit functions called only from kernels have none
            for arch in args.arch:
                key, build = compile_launch(rec.fn, launch_args, kwargs, GPUTarget("cuda", arch, 32))
                if key in seen:
                    continue
                seen.add(key)
                kernel = build()
                compiled.add(name)
                if args.cubin_dir:
                    Path(args.cubin_dir, f"{name}-sm{arch}-{len(seen)}.cubin").write_bytes(kernel.asm["cubin"])
    print(f"COMPILED {' '.join(sorted(compiled))} ({len(seen)} kernel variants x targets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
