"""``headkv-vllm node-check`` (the staged serving-node check, scripts/gpu_node_check.sh)
run for real on the CPU: its 'eager' stage against stock vLLM's CPU backend."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from headkv_vllm.tools.deploy.node_check import STAGES, checks, log_checks, stage_servers

ROOT = Path(__file__).resolve().parents[2]


def test_stages_start_the_engine_as_documented():
    for stage in STAGES:
        stock, full, comp = (cfg.command(8000) for _, cfg in stage_servers(stage, "M", "bfloat16", 4096, 2**30, 0.85,
                                                                            "TRITON_ATTN"))
        assert ("--enforce-eager" in full) == (stage == "eager")
        assert ("--kv-cache-memory-bytes" in full) == (stage != "profiled")
        assert ("--gpu-memory-utilization" in full) == (stage == "profiled")
        assert stock[stock.index("--attention-backend") + 1] == "TRITON_ATTN"
        assert json.loads(full[full.index("--additional-config") + 1]) == {"headkv": {"policy": "snapkv", "kv_size": 4096}}
        assert json.loads(comp[comp.index("--additional-config") + 1]) == {"headkv": {"kv_size": 128}}


SAME = "HEADKV with budgets >= prompt gives stock vLLM's greedy tokens"


def test_a_differing_token_fails_the_stage_unless_stock_was_near_a_tie_before_it():
    stock = [{"tokens": ["a", "b", "c"], "margins": [3.0, 0.01, 2.0], "text": "abc", "finish_reason": "length"}]
    servers = {"stock": {"outputs": stock},
               "headkv_uncompressed": {"outputs": [{**stock[0], "tokens": ["a", "b", "x"]}]},
               "headkv_compressed": {"error": "ServerError: exited"}}
    verdicts = {c["check"]: c["passed"] for c in checks(servers)}
    assert verdicts[SAME] is False and verdicts["headkv_compressed started and answered"] is False
    # stock's 2nd token was a near-tie: what follows it may differ, what precedes it may not
    assert {c["check"]: c["passed"] for c in checks(servers, tie_margin=0.05)}[SAME] is True
    servers["headkv_uncompressed"]["outputs"][0]["tokens"] = ["z", "b", "c"]
    assert {c["check"]: c["passed"] for c in checks(servers, tie_margin=0.05)}[SAME] is False


def test_on_cuda_the_logs_must_show_what_each_stage_is_about():
    cuda = ("device_config=cuda\nUsing HEADKV backend.\nHeadKV: policy=snapkv\nModel Runner V2 does not yet "
            "support the HEADKV attention backend (...); using the V1 model runner instead.\n"
            "CUDAGraphMode.FULL_AND_PIECEWISE is not supported ...; setting cudagraph_mode=PIECEWISE because ...\n")
    assert all(c["passed"] for c in log_checks("eager", "headkv", cuda))
    graphs = {c["check"]: c["passed"] for c in log_checks("graphs", "headkv", cuda)}
    assert graphs["headkv: CUDA graphs captured"] is False and graphs["headkv: piecewise CUDA graphs resolved for HEADKV"]
    assert len(log_checks("profiled", "headkv", cuda + "Graph capturing finished in 3 secs")) == 5
    assert len(log_checks("profiled", "headkv", "Using HEADKV backend.\nHeadKV: policy=x")) == 1  # not CUDA


@pytest.mark.slow
def test_eager_stage_passes_on_the_cpu(model_dir, tmp_path):
    cmd = [str(Path(sys.executable).with_name("headkv-vllm")), "node-check", "--stage", "eager",
           "--model", str(model_dir), "--dtype", "float32", "--stock-backend", "CPU_ATTN",
           "--kv-cache-bytes", str(2**30), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    result = json.loads((tmp_path / "node_check_eager.json").read_text())
    assert result["passed"] and len(result["checks"]) == 7 and result["tie_margin"] == 0.0
    assert "PASSED" in proc.stdout and "[ok] HEADKV with budgets >= prompt gives stock" in proc.stdout
    pool = result["servers"]["headkv_compressed"]["headkv_pool"]
    assert pool["kv_size"] == 128 and "SmolLM2-135M-Instruct_R2.json" in pool["budget_origin"]


def run_node_script(tmp_path, fail_stage=""):
    """scripts/gpu_node_check.sh with a named fake ``docker`` (the real one needs a GPU
    node and the image): it records each command and fails the stage ``fail_stage``."""
    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$@" >> "$DOCKER_LOG"\n'
                    'case "$*" in *"--stage $FAIL_STAGE "*) [ -n "$FAIL_STAGE" ] && exit 1;; esac\nexit 0\n')
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "HOME": str(tmp_path), "DOCKER_LOG": str(tmp_path / "log"),
           "FAIL_STAGE": fail_stage, "RESULTS": str(tmp_path / "results")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_node_check.sh"), "org/Model", "--dtype", "float16"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    return proc, (tmp_path / "log").read_text().splitlines()


def test_node_script_runs_the_stages_in_order_and_stops_at_a_failure(tmp_path):
    proc, calls = run_node_script(tmp_path)
    assert proc.returncode == 0 and "All stages passed" in proc.stdout
    assert [c.split("--stage ")[1].split()[0] for c in calls] == list(STAGES)
    assert all("--gpus all" in c and "--entrypoint headkv-vllm headkv-vllm node-check" in c
               and "--model org/Model --out /results --dtype float16" in c for c in calls)
    (tmp_path / "again").mkdir()
    proc, calls = run_node_script(tmp_path / "again", fail_stage="graphs")
    assert proc.returncode == 1 and "stage graphs FAILED" in proc.stderr
    assert [c.split("--stage ")[1].split()[0] for c in calls] == ["eager", "graphs"]
