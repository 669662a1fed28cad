"""scripts/bench_kernels.py: its pure-Python parts on any machine; on a CUDA
device a --quick run and its JSON."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from headkv_vllm.kernels.head_page_rows import head_page_slots
from support.kernel_cases import DEVICE

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_kernels.py"
spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
bench = sys.modules["bench_kernels"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)  # importable without a GPU


@pytest.mark.parametrize("name,gbps", [
    ("NVIDIA H100 80GB HBM3", 3350), ("NVIDIA H100 PCIe", 2000), ("NVIDIA H100 NVL", 3900),
    ("NVIDIA H200", 4800), ("NVIDIA A100-SXM4-80GB", 2039), ("NVIDIA A100 80GB PCIe", 1935),
    ("NVIDIA A100-SXM4-40GB", 1555), ("NVIDIA L4", 300), ("NVIDIA L40S", 864),
])
def test_peak_bandwidth_table(name, gbps):
    assert bench.peak_gbps(name)[0] == gbps
    assert bench.peak_gbps(name, override=1234.0) == (1234.0, "--peak-gbps")


def test_unknown_device_has_no_peak():
    assert bench.peak_gbps("NVIDIA GH200 480GB")[0] is None
    assert bench.peak_gbps("Some GPU")[0] is None


@pytest.mark.parametrize("kv_size,context", [(128, 8192), (1024, 4096), (128, 100), (20, 8192), (1024, 1030)])
@pytest.mark.parametrize("seed", range(3))
def test_skewed_lengths_have_the_exact_mean_and_bounds(kv_size, context, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = bench.skewed_head_lengths(8, kv_size, context, 8, g)
    assert int(lengths.sum()) == 8 * min(kv_size, context)
    assert int(lengths.min()) >= min(8, context) and int(lengths.max()) <= context


def test_skewed_lengths_are_skewed():
    g = torch.Generator().manual_seed(0)
    lengths = torch.cat([bench.skewed_head_lengths(8, 128, 8192, 8, g) for _ in range(50)])
    assert float(lengths.float().median()) < 100 < 300 < int(lengths.max())


def test_decode_bytes_by_hand():
    shapes = bench.Shapes(num_q_heads=4, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_size=16)
    lengths = torch.tensor([[16, 17], [1, 40]])
    kv = (16 + 17 + 1 + 40) * 2 * 8 * 2  # tokens x (K, V) x head_dim x 2 bytes
    q_out = 2 * 2 * 4 * 8 * 2  # (q, out) x B x Hq x head_dim x 2 bytes
    pages = 1 + 2 + 1 + 3
    assert bench.decode_bytes(lengths, shapes) == kv + q_out + 4 * pages
    assert bench.decode_bytes(lengths, shapes, page_table=False) == kv + q_out
    dense = torch.full((2, 2), 40)
    assert bench.decode_bytes(dense, shapes, pages_shared_by_heads=True) == 160 * 2 * 8 * 2 + q_out + 4 * (3 + 3)


def test_goals_read_the_issue_targets_off_the_rows():
    decode = [dict(kernel="headkv_block_table", context=8192, batch=b, kv_per_head=128, speedup_vs_dense=20.0 + b,
                   peak_fraction=0.5) for b in (1, 64)]
    prefill = [dict(kernel="score_select_store", context=8192, kv_per_head=128, fraction_of_prefill_attention=0.05)]
    assert bench.goals(decode, prefill) == {
        "decode_kv128_ctx8k_speedup_vs_dense (goal >= 20)": {1: 21.0, 64: 84.0},
        "decode_kv128_batch64_peak_fraction (goal >= 0.6)": {8192: 0.5},
        "prefill_ctx8k_score_select_store_fraction (goal < 0.10)": {128: 0.05},
    }


def test_bench_head_pages_follow_the_layout():
    g = torch.Generator().manual_seed(0)
    shapes = bench.Shapes(head_dim=16, dtype="float32", block_size=8)
    kept = torch.stack([bench.skewed_head_lengths(8, 40, 500, 8, g) for _ in range(3)])
    pages, rows = bench.head_pages(kept, shapes, "cpu", g)
    assert rows.shape[1] == int((-(-kept // 8)).sum(1).max())
    p = torch.arange(int(kept.max()))
    slots = head_page_slots(rows, kept, p, 8)
    used = slots[p < kept[:, :, None]]
    assert used.unique().numel() == used.numel() and int(used.min()) >= 8  # distinct, never the null block
    assert int(used.max()) < pages.shape[0] * 8


def test_benchmark_runs_end_to_end_at_tiny_shapes(monkeypatch, capsys):
    # Every measurement path, on this machine's device, with each timed call run once.
    monkeypatch.setattr(bench, "_time_ms", lambda fn: (fn(), 1.0)[1])
    shapes = bench.Shapes(num_q_heads=6, num_kv_heads=2, head_dim=16, dtype="float32", block_size=8)
    g = torch.Generator().manual_seed(0)
    decode = bench.bench_decode(80, 2, [16], shapes, 100.0, g, dev=DEVICE)
    prefill = bench.bench_prefill(80, [16], shapes, g, dev=DEVICE)
    kernels = [r["kernel"] for r in decode]
    assert kernels == ["dense_paged_triton", "sdpa_contiguous", "headkv_block_table", "headkv_slot_table"]
    dense, headkv = decode[0], decode[2]
    assert dense["bytes"] == bench.decode_bytes(torch.full((2, 2), 80), shapes, pages_shared_by_heads=True)
    assert headkv["gbps"] == pytest.approx(headkv["bytes"] / 1e6) and headkv["peak_fraction"] == pytest.approx(headkv["gbps"] / 100)
    assert [r["kernel"] for r in prefill] == ["prefill_attention_sdpa", "score_select_store"]
    assert prefill[1]["fraction_of_prefill_attention"] == 1.0
    bench.print_table(decode, prefill, 100.0)
    assert "headkv_block_table" in capsys.readouterr().out
    json.dumps(bench.goals(decode, prefill))


def test_help_and_clear_error_without_cuda(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, str(SCRIPT), *a], capture_output=True, text=True, timeout=300)
    help_ = run("--help")
    assert help_.returncode == 0 and "--peak-gbps" in help_.stdout and "--quick" in help_.stdout
    out = tmp_path / "bench.json"
    proc = run("--quick", "--out", str(out))
    if DEVICE.type == "cpu":
        assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr
        assert not out.exists()
    else:  # a real smoke run
        assert proc.returncode == 0, proc.stderr[-4000:]
        result = json.loads(out.read_text())
        assert result["device"] == torch.cuda.get_device_name()
        assert {"torch", "triton", "command", "peak_gbps", "decode", "prefill"} <= set(result)
        assert all(r.get("ms") or r.get("error") for r in result["decode"] + result["prefill"])
