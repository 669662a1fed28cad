"""``headkv-vllm bench``: workload, KV bytes, latency statistics and options (fast), and
a small run of stock vLLM and HEADKV servers at the same KV cache size (slow)."""

import json
import subprocess
import sys
import threading

import pytest

from support.engines import ROOT
from headkv_vllm.tools.bench.serving import parse_args
from headkv_vllm.tools.bench.measure import (add_ratios, bench_table, kv_bytes_per_request, latency_stats, stock_kv_bytes_for,
                                   stock_request_bytes)
from headkv_vllm.tools.common.methods import Method
from headkv_vllm.tools.common.plots import bench_plot, itl_plot
from headkv_vllm.method.scores import ModelIdentity
from headkv_vllm.tools.common.serve_process import GaugeWatcher

SMOL = ModelIdentity("SmolLM2-135M-Instruct", 30, 9, 3, 64)
STOCK_TOKEN_BYTES = 2 * 30 * 3 * 64 * 4  # K and V, 30 layers, 3 KV heads, head_dim 64, float32


def test_stock_bytes_count_the_tokens():
    prompts = [[0] * 100, [0] * 200]  # + 28 output tokens: 128 and 228 tokens
    assert stock_request_bytes(SMOL, prompts, 28) == (128 + 228) / 2 * STOCK_TOKEN_BYTES
    assert stock_kv_bytes_for(SMOL, prompts, 28, 4) == int(4 * (128 + 228) / 2 * STOCK_TOKEN_BYTES)


def test_headkv_request_bytes_follow_the_budgets():
    prompts = [[0] * 2500]
    snap = Method("snapkv", 128, {"policy": "snapkv", "kv_size": 128})
    # uniform budget 128 + 256 generated = 384 tokens = 24 pages per head, 90 heads, pages of 16 x 64 x 2 x 4 bytes
    assert kv_bytes_per_request(SMOL, snap, prompts, 256) == 24 * 90 * 16 * 64 * 2 * 4
    stock = kv_bytes_per_request(SMOL, Method("full", None, None), prompts, 256)
    assert stock / kv_bytes_per_request(SMOL, snap, prompts, 256) == pytest.approx(2756 / 384, rel=0.01)
    uncompressed = Method("snapkv", 4096, {"policy": "snapkv", "kv_size": 4096})
    assert kv_bytes_per_request(SMOL, uncompressed, prompts, 256) == pytest.approx(stock, rel=0.01)


def test_latency_statistics():
    timings = [
        {"sent": 0.0, "arrivals": [1.0, 1.1, 1.2, 1.3], "tokens": 4, "prompt_tokens": 10},
        {"sent": 0.0, "arrivals": [3.0, 3.5, 4.0], "tokens": 3, "prompt_tokens": 20},
    ]
    s = latency_stats(timings)
    assert s["duration_s"] == 4.0 and s["output_tokens"] == 7
    assert s["requests_per_s"] == 0.5 and s["output_tokens_per_s"] == 7 / 4
    assert s["ttft_mean_s"] == 2.0 and s["ttft_p99_s"] == 3.0
    assert s["itl_mean_s"] == pytest.approx((0.1 * 3 + 0.5 * 2) / 5) and s["itl_p99_s"] == 0.5


def test_one_output_token_has_no_inter_token_latency():
    s = latency_stats([{"sent": 0.0, "arrivals": [2.0], "tokens": 1, "prompt_tokens": 10}])
    assert s["itl_mean_s"] is None and s["itl_p99_s"] is None
    assert json.loads(json.dumps(s, allow_nan=False)) == s


class _FlakyMetrics:
    """A server whose /metrics answers, times out, or breaks in turn (a busy server on 2 cores)."""

    def __init__(self, answers: list):
        self.answers, self.done = list(answers), threading.Event()

    def metrics(self, timeout_s: float = 60) -> dict[str, float]:
        answer = self.answers.pop(0) if self.answers else None
        if not self.answers:
            self.done.set()
        if isinstance(answer, Exception):
            raise answer
        return answer or {}


def test_gauge_watcher_survives_failed_polls_and_counts_them():
    import httpx

    server = _FlakyMetrics([httpx.ReadTimeout("slow"), {"vllm:num_requests_running": 3.0}, ValueError("bad text"),
                            {"vllm:num_requests_running": 6.0}, {"vllm:num_requests_running": 0.0}])
    with GaugeWatcher(server, ("vllm:num_requests_running",), interval_s=0.001) as gauges:
        assert server.done.wait(10)
    assert gauges.peak["vllm:num_requests_running"] == 6.0
    assert gauges.failures == 2 and gauges.samples >= 3 and gauges.last_error == "ValueError: bad text"


def _config(name: str, method: str, kv_size, tok_s: float, peak) -> dict:
    return {"config": name, "method": method, "kv_size": kv_size, "requests_per_s": 1.0, "output_tokens_per_s": tok_s,
            "ttft_mean_s": 1.0, "ttft_p99_s": 2.0, "itl_mean_s": 0.1, "itl_p99_s": 0.2, "peak_running": peak,
            "preemptions": 0.0, "kv_bytes_per_request": 2**20, "duration_s": 10.0, "load_average_mean": 1.0}


def test_unread_gauges_show_as_unknown_not_zero(tmp_path):
    result = {"model": "m", "kv_cache_bytes": 2**24, "stock_requests_that_fit": 2.0,
              "workload": {"num_requests": 4, "prompt_tokens": [300, 400], "output_tokens": 8},
              "configs": [_config("stock vLLM", "full", None, 10.0, 2.0),
                          _config("SnapKV @ 32", "snapkv", 32, 20.0, None),
                          _config("SnapKV @ 64", "snapkv", 64, 15.0, 4.0)]}
    add_ratios(result["configs"])
    unread, read = result["configs"][1:]
    assert unread["peak_running_x_stock"] is None and read["peak_running_x_stock"] == 2.0
    assert unread["output_tokens_per_s_x_stock"] == 2.0
    row = next(line for line in bench_table(result).splitlines() if line.startswith("| SnapKV @ 32"))
    assert "| - | - |" in row
    assert bench_plot(result, tmp_path / "b.png").stat().st_size > 0
    assert itl_plot(result, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()  # no gaps
    result["configs"][0]["itl_percentiles_s"] = [0.01 * (1 + q / 10) for q in range(101)]
    assert itl_plot(result, tmp_path / "itl.png").stat().st_size > 0  # configs without a distribution are left out


@pytest.mark.parametrize("argv, message", [
    (["--method", "full"], "--method"),
    (["--method", "h2o"], "--method"),
    (["--prompt-tokens", "3000:2000"], "--prompt-tokens"),
    (["--prompt-tokens", "many"], "--prompt-tokens"),
    (["--kv-sizes", "4"], "--kv-sizes"),
    (["--stock-fits", "0"], "--stock-fits"),
    (["--kv-cache-bytes", "1000", "--stock-fits", "2"], "not allowed with"),
])
def test_bad_options_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_vllm_args_reach_every_server_command():
    import shlex

    from headkv_vllm.tools.common.serve_process import ServerConfig

    args = parse_args(["--vllm-args", "--watermark 0.05 --max-num-batched-tokens 1024"])
    cmd = ServerConfig(model="m", extra_args=tuple(shlex.split(args.vllm_args))).command(8000)
    assert cmd[-4:] == ["--watermark", "0.05", "--max-num-batched-tokens", "1024"]


def test_one_step_runs_turn_chunked_prefill_off_with_a_whole_prompt_budget():
    from headkv_vllm.tools.bench.measure import server_args

    assert parse_args(["--one-step-too"]).one_step_too and not parse_args([]).one_step_too
    assert server_args("--watermark 0.05", 3328, False) == ("--watermark", "0.05")
    assert server_args("", 3328, True) == ("--no-enable-chunked-prefill", "--max-num-batched-tokens", "3328")
    assert server_args("", 512, True)[-1] == "2048"


@pytest.mark.slow
def test_small_run_stock_and_headkv_at_the_same_kv_bytes(model_dir, tmp_path):
    out = tmp_path / "bench"
    # 64 output tokens: the decode phase lasts seconds, long enough for the gauge polls to
    # see every request running (with 8 it was over between two polls).
    cmd = [sys.executable, "-m", "headkv_vllm.cli", "bench", "--model", str(model_dir), "--method", "snapkv",
           "--kv-sizes", "32", "--num-requests", "6", "--prompt-tokens", "300:400", "--output-tokens", "64",
           "--stock-fits", "2", "--name", "smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "smoke.json").read_text())
    stock, headkv = result["configs"]
    assert stock["method"] == "full" and headkv["kv_size"] == 32
    for c in (stock, headkv):
        assert c["output_tokens"] == 6 * 64 and c["ttft_mean_s"] > 0 and c["itl_mean_s"] > 0
        gauges = {k: c.get(k) for k in ("peak_running", "gauge_samples", "gauge_failures", "gauge_last_error")}
        assert c["gauge_samples"] > 0 and c["peak_running"] >= 1, (c["config"], gauges)
        assert "--kv-cache-memory-bytes " + str(result["kv_cache_bytes"]) in c["server"]["command"]
    # the HEADKV pool (head pages of 16 tokens x 64 x K,V x 4 bytes) is the bytes both servers were given
    pool = headkv["server"]["headkv_pool"]["pool_head_pages"] * 16 * 64 * 2 * 4
    assert pool == pytest.approx(result["kv_cache_bytes"], rel=0.01)
    # the stock cache holds about 2 requests; compressed ones all run together
    assert stock["peak_running"] <= 3 and headkv["peak_running"] == 6
    assert headkv["peak_running_x_stock"] >= 2
    assert (out / "smoke.png").stat().st_size > 0 and "stock vLLM" in (out / "smoke.md").read_text()
    assert (out / "smoke_itl.png").stat().st_size > 0
    for c in (stock, headkv):
        pct = c["itl_percentiles_s"]
        assert len(pct) == 101 and pct == sorted(pct) and pct[99] == c["itl_p99_s"] and pct[100] == c["itl_max_s"]
