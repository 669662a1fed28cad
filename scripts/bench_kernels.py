"""Benchmark HeadKV's Triton kernels on a CUDA device, at Llama-3-8B attention shapes
(32 query heads, 8 KV heads, head_dim 128, bf16, pages of 16 tokens).

(a) Decode attention, one query token per sequence, per layer: HeadKV over per-head
    pages (block-table and slot-table kernels) at an average KV size per head, vs
    dense paged decode over the full cache (the same split-K Triton kernel reading
    every token of every head) and vs torch SDPA on contiguous K/V. Achieved GB/s
    count the bytes each must read (K/V of its tokens, q, out, page-table entries)
    against the device's peak bandwidth.
(b) Prefill, one prompt: window scoring + selection + store (Triton) as a fraction
    of prefill attention (torch SDPA, causal) on the same prompt.

Per-head lengths are skewed like HeadKV budgets (Pareto head weights; a few heads
hold most tokens) with an exact mean of the KV size. Prints a table and writes
results/kernels-<device>.json (-quick.json with --quick). Never asserts timings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Peak memory bandwidth (GB/s, vendor figures) by device name as torch reports it;
# first match wins, so more specific patterns come first.
PEAK_GBPS = [
    (r"\bH200\b", 4800.0),
    (r"\bH100\b.*\bNVL\b", 3900.0),
    (r"\bH100\b.*\bPCIe\b", 2000.0),
    (r"\bH100\b", 3350.0),  # SXM5, "NVIDIA H100 80GB HBM3"
    (r"\bA100\b.*80GB.*PCIe", 1935.0),
    (r"\bA100\b.*80GB", 2039.0),
    (r"\bA100\b", 1555.0),  # 40GB
    (r"\bB200\b", 8000.0),
    (r"\bL40S\b", 864.0),
    (r"\bL4\b", 300.0),
    (r"\bA10G\b", 600.0),
    (r"RTX 4090", 1008.0),
]


@dataclass(frozen=True)
class Shapes:
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"
    block_size: int = 16
    window: int = 8
    pool_kernel: int = 7

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def elem_size(self) -> int:
        return torch.empty(0, dtype=self.torch_dtype).element_size()


LLAMA3_8B = Shapes()


def peak_gbps(device_name: str, override: float | None = None) -> tuple[float | None, str]:
    """(peak GB/s, where it came from) for a device name."""
    if override is not None:
        return override, "--peak-gbps"
    for pattern, gbps in PEAK_GBPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return gbps, f"table: {pattern}"
    return None, "unknown device: pass --peak-gbps"


def skewed_head_lengths(num_heads: int, kv_size: int, context: int, window: int, gen: torch.Generator) -> torch.Tensor:
    """[num_heads] int64 tokens per head: mean exactly ``kv_size`` (``context`` if
    smaller), each in [min(window, context), context], skewed by Pareto(1.2) weights
    as HeadKV budgets are; what a head cannot hold goes to the others."""
    lo, hi = min(window, context), context
    mean = min(kv_size, context)
    total = mean * num_heads
    weights = torch.rand(num_heads, generator=gen, dtype=torch.float64).clamp_min(1e-9) ** (-1 / 1.2)
    lengths = torch.full((num_heads,), float(lo), dtype=torch.float64)
    for _ in range(100):  # redistribute the excess of full heads
        free = lengths < hi
        excess = total - float(lengths.sum())
        if excess < 1e-6 or not bool(free.any()):
            break
        lengths[free] += excess * weights[free] / weights[free].sum()
        lengths.clamp_(max=hi)
    out = lengths.floor().long()
    short = total - int(out.sum())
    room = (out < hi).nonzero().flatten()
    order = room[(lengths - out)[room].argsort(descending=True)]
    out[order[:short]] += 1
    return out


def decode_bytes(lengths: torch.Tensor, shapes: Shapes, pages_shared_by_heads: bool = False,
                 page_table: bool = True) -> int:
    """Bytes a decode step must move for one layer: K and V of every token each
    head holds ([B, Hkv] lengths), q read and out written, and one int32 page-table
    entry per page (a dense page holds every head: ``pages_shared_by_heads``)."""
    lengths = torch.as_tensor(lengths)
    batch = lengths.shape[0]
    kv = int(lengths.sum()) * 2 * shapes.head_dim * shapes.elem_size
    q_out = 2 * batch * shapes.num_q_heads * shapes.head_dim * shapes.elem_size
    pages = -(-lengths // shapes.block_size)
    table = 4 * int(pages[:, 0].sum() if pages_shared_by_heads else pages.sum()) if page_table else 0
    return kv + q_out + table


def head_pages(kept: torch.Tensor, shapes: Shapes, device, gen: torch.Generator):
    """Random head pages for ``kept`` [B, Hkv] tokens per head, and block-table rows
    [B, W] int32 with each head's pages at their canonical positions
    (docs/kv_layout.md) on scattered blocks. Returns (pages, rows)."""
    from headkv_vllm.method.layout import page_positions

    bs = shapes.block_size
    num_pages = -(-kept // bs)  # [B, H]
    max_pages = int(num_pages.max())
    pos = page_positions(kept, bs, max_pages)  # [B, H, J]
    used = torch.arange(max_pages)[None, None, :] < num_pages[:, :, None]
    ids = torch.randperm(int(num_pages.sum()), generator=gen) + 1  # block 0 is the null block
    rows = torch.zeros(kept.shape[0], int(num_pages.sum(1).max()), dtype=torch.int32)
    batch_idx = torch.arange(kept.shape[0])[:, None, None].expand_as(pos)
    rows[batch_idx[used], pos[used]] = ids.int()
    pages = torch.randn(int(num_pages.sum()) + 1, 2, bs, shapes.head_dim, dtype=shapes.torch_dtype, device=device)
    return pages, rows.to(device)


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- CUDA


def _time_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _record(rows, peak, **row):
    ms = row.get("ms")
    if ms is not None and row.get("bytes"):
        row["gbps"] = gbps(row["bytes"], ms)
        row["peak_fraction"] = row["gbps"] / peak if peak else None
    rows.append(row)
    return row


def _try(fn):
    try:
        return fn(), None
    except torch.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return None, f"out of memory: {str(e).splitlines()[0]}"


def bench_decode(context: int, batch: int, kv_sizes, shapes: Shapes, peak, gen, dev="cuda") -> list[dict]:
    import torch.nn.functional as F

    from headkv_vllm.kernels.dense_paged_decode import dense_paged_decode_triton
    from headkv_vllm.kernels.head_page_rows import head_page_slots
    from headkv_vllm.kernels.paged_decode import paged_decode_triton
    from headkv_vllm.kernels.paged_decode_block_table import paged_decode_block_table_triton

    dt, hkv, d, bs = shapes.torch_dtype, shapes.num_kv_heads, shapes.head_dim, shapes.block_size
    scale = d**-0.5
    rows: list[dict] = []
    common = dict(context=context, batch=batch)
    q = torch.randn(batch, shapes.num_q_heads, d, dtype=dt, device=dev)
    full = torch.full((batch, hkv), context)

    # Dense paged decode over the whole cache (every head holds every token).
    width = -(-context // bs)
    kv_cache = torch.randn(2, batch * width + 1, bs, hkv, d, dtype=dt, device=dev)
    table = (torch.randperm(batch * width, generator=gen) + 1).view(batch, width).int().to(dev)
    seq_lens = torch.full((batch,), context, device=dev)
    dense_ms = _time_ms(lambda: dense_paged_decode_triton(q, kv_cache, table, seq_lens, scale))
    _record(rows, peak, kernel="dense_paged_triton", kv_per_head=context, ms=dense_ms,
            bytes=decode_bytes(full, shapes, pages_shared_by_heads=True), **common)
    del kv_cache, table

    # torch SDPA on contiguous K/V [B, Hkv, context, d].
    def sdpa_ms():
        k = torch.randn(batch, hkv, context, d, dtype=dt, device=dev)
        v = torch.randn_like(k)
        return _time_ms(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True))

    ms, err = _try(sdpa_ms)
    _record(rows, peak, kernel="sdpa_contiguous", kv_per_head=context, ms=ms, error=err,
            bytes=decode_bytes(full, shapes, page_table=False), **common)
    torch.cuda.empty_cache()

    for kv_size in kv_sizes:
        kept = torch.stack([skewed_head_lengths(hkv, kv_size, context, shapes.window, gen) for _ in range(batch)])
        pages, block_rows = head_pages(kept, shapes, dev, gen)
        kept_d = kept.to(dev)
        nbytes = decode_bytes(kept, shapes)
        max_len = int(kept.max())  # the metadata builder knows it on the host
        ms = _time_ms(lambda: paged_decode_block_table_triton(q, pages, block_rows, kept_d, kept_d, scale, max_len))
        _record(rows, peak, kernel="headkv_block_table", kv_per_head=kv_size, kv_per_head_max=max_len,
                ms=ms, bytes=nbytes, speedup_vs_dense=dense_ms / ms, **common)
        slots = head_page_slots(block_rows, kept_d, torch.arange(max_len, device=dev), bs)
        ms = _time_ms(lambda: paged_decode_triton(q, pages, slots, kept_d, scale))
        slot_bytes = nbytes + 8 * int(kept.sum())  # plus one int64 slot per token
        _record(rows, peak, kernel="headkv_slot_table", kv_per_head=kv_size, kv_per_head_max=max_len,
                ms=ms, bytes=slot_bytes, speedup_vs_dense=dense_ms / ms, **common)
        del pages, slots
    torch.cuda.empty_cache()
    return rows


def bench_prefill(context: int, kv_sizes, shapes: Shapes, gen, dev="cuda") -> list[dict]:
    import torch.nn.functional as F

    from headkv_vllm.kernels.head_page_rows import head_page_slots
    from headkv_vllm.kernels.select_store import select_and_store_triton
    from headkv_vllm.kernels.window_scores import window_scores_triton

    dt, d, bs, w = shapes.torch_dtype, shapes.head_dim, shapes.block_size, shapes.window
    hq, hkv, scale = shapes.num_q_heads, shapes.num_kv_heads, d**-0.5
    # Token-major [n, heads, d], as the backend gets them.
    q = torch.randn(context, hq, d, dtype=dt, device=dev)
    k = torch.randn(context, hkv, d, dtype=dt, device=dev)
    v = torch.randn_like(k)
    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))

    def attention():  # what the backend runs
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)

    def attention_expanded():  # for a torch whose flash kernel lacks GQA (math would not fit at 32k)
        ke, ve = (x.repeat_interleave(hq // hkv, dim=1) for x in (kt, vt))
        return _time_ms(lambda: F.scaled_dot_product_attention(qt, ke, ve, is_causal=True, scale=scale))

    attn_ms, err = _try(lambda: _time_ms(attention))
    variant = "enable_gqa"
    if attn_ms is None:
        (attn_ms, err), variant = _try(attention_expanded), "kv_expanded_to_query_heads"
    rows = [dict(context=context, kernel="prefill_attention_sdpa", sdpa=variant, ms=attn_ms, error=err)]
    scores = window_scores_triton(q[context - w:], k, scale, shapes.pool_kernel)
    score_ms = _time_ms(lambda: window_scores_triton(q[context - w:], k, scale, shapes.pool_kernel))
    for kv_size in kv_sizes:
        kept = skewed_head_lengths(hkv, kv_size, context, w, gen)
        caps = (kept - min(w, context)).to(dev)
        pages, block_rows = head_pages(kept[None], shapes, dev, gen)
        slots = head_page_slots(block_rows, kept[None].to(dev), torch.arange(int(kept.max()), device=dev), bs)[0]
        lengths = kept.to(dev)
        store_ms = _time_ms(lambda: select_and_store_triton(scores, k, v, caps, lengths, slots, pages))

        def both():
            select_and_store_triton(window_scores_triton(q[context - w:], k, scale, shapes.pool_kernel),
                                    k, v, caps, lengths, slots, pages)

        total_ms = _time_ms(both)
        rows.append(dict(context=context, kernel="score_select_store", kv_per_head=kv_size, ms=total_ms,
                         score_ms=score_ms, select_store_ms=store_ms,
                         fraction_of_prefill_attention=total_ms / attn_ms if attn_ms else None))
    torch.cuda.empty_cache()
    return rows


def goals(decode: list[dict], prefill: list[dict]) -> dict:
    """The issue's targets, read off the rows (absent when not measured)."""
    def find(rows, **match):
        return [r for r in rows if all(r.get(k) == v for k, v in match.items())]

    out = {}
    speedups = {r["batch"]: r["speedup_vs_dense"] for r in find(decode, kernel="headkv_block_table", context=8192, kv_per_head=128)}
    if speedups:
        out["decode_kv128_ctx8k_speedup_vs_dense (goal >= 20)"] = speedups
    fractions = {r["context"]: r.get("peak_fraction") for r in find(decode, kernel="headkv_block_table", batch=64, kv_per_head=128)}
    if fractions:
        out["decode_kv128_batch64_peak_fraction (goal >= 0.6)"] = fractions
    overhead = {r["kv_per_head"]: r["fraction_of_prefill_attention"] for r in find(prefill, kernel="score_select_store", context=8192)}
    if overhead:
        out["prefill_ctx8k_score_select_store_fraction (goal < 0.10)"] = overhead
    return out


def print_table(decode: list[dict], prefill: list[dict], peak) -> None:
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    print(f"\nDecode attention, one layer (peak {fmt(peak, '.0f')} GB/s)")
    print(f"{'context':>8} {'batch':>5} {'kernel':<20} {'KV/head':>8} {'time us':>9} {'MB read':>9} {'GB/s':>7} "
          f"{'% peak':>7} {'x dense':>8}")
    for r in decode:
        pct = None if r.get("peak_fraction") is None else 100 * r["peak_fraction"]
        print(f"{r['context']:>8} {r['batch']:>5} {r['kernel']:<20} {r['kv_per_head']:>8} "
              f"{fmt(None if r.get('ms') is None else 1e3 * r['ms'], '9.1f')} {r['bytes'] / 1e6:>9.1f} "
              f"{fmt(r.get('gbps'), '7.0f')} {fmt(pct, '7.1f')} {fmt(r.get('speedup_vs_dense'), '8.1f')}"
              + (f"  {r['error']}" if r.get("error") else ""))
    print("\nPrefill, one prompt: scoring + selection + store vs prefill attention")
    print(f"{'context':>8} {'kernel':<24} {'KV/head':>8} {'time us':>9} {'score us':>9} {'sel+store us':>12} {'fraction':>9}")
    for r in prefill:
        ms = None if r.get("ms") is None else 1e3 * r["ms"]
        print(f"{r['context']:>8} {r['kernel']:<24} {r.get('kv_per_head', '-'):>8} {fmt(ms, '9.1f')} "
              f"{fmt(r.get('score_ms') and 1e3 * r['score_ms'], '9.1f')} "
              f"{fmt(r.get('select_store_ms') and 1e3 * r['select_store_ms'], '12.1f')} "
              f"{fmt(r.get('fraction_of_prefill_attention'), '9.3f')}" + (f"  {r['error']}" if r.get("error") else ""))


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--quick", action="store_true", help="tiny contexts and batches: a smoke run in seconds")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--kv-sizes", type=int, nargs="+", default=[128, 1024], help="average tokens kept per KV head")
    parser.add_argument("--peak-gbps", type=float, help="device peak memory bandwidth, GB/s (default: from a table)")
    parser.add_argument("--out", type=Path, help="JSON path (default: results/kernels-<device>[-quick].json)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.contexts, args.batches, args.kv_sizes = [1024, 2048], [1, 4], [64, 128]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA device (torch.cuda.is_available() is False). "
              "Without one, run the kernels' interpreter tests: pytest tests/kernels/test_kernels_*.py", file=sys.stderr)
        return 2
    import triton

    shapes = LLAMA3_8B
    name = torch.cuda.get_device_name()
    peak, peak_source = peak_gbps(name, args.peak_gbps)
    gen = torch.Generator().manual_seed(args.seed)
    decode, prefill = [], []
    for context in args.contexts:
        for batch in args.batches:
            decode += bench_decode(context, batch, args.kv_sizes, shapes, peak, gen)
        prefill += bench_prefill(context, args.kv_sizes, shapes, gen)
    print_table(decode, prefill, peak)
    result = {
        "device": name,
        "capability": list(torch.cuda.get_device_capability()),
        "peak_gbps": peak,
        "peak_source": peak_source,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "command": shlex.join(["python", "scripts/bench_kernels.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shapes": asdict(shapes),
        "goals": goals(decode, prefill),
        "decode": decode,
        "prefill": prefill,
    }
    out = args.out or ROOT / "results" / f"kernels-{device_slug(name)}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
