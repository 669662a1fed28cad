"""``headkv-vllm node-check`` (the staged serving-node check, scripts/gpu_node_check.sh)
run for real on the CPU: its 'eager' stage against stock vLLM's CPU backend."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from headkv_vllm.tools.node_check import STAGES, checks, stage_servers

ROOT = Path(__file__).resolve().parents[1]


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


def test_a_differing_token_fails_the_stage():
    out = [{"tokens": ["a", "b"], "text": "ab", "finish_reason": "length"}]
    servers = {"stock": {"outputs": out}, "headkv_uncompressed": {"outputs": [{**out[0], "tokens": ["a", "c"]}]},
               "headkv_compressed": {"error": "ServerError: exited"}}
    verdicts = {c["check"]: c["passed"] for c in checks(servers)}
    assert verdicts["HEADKV with budgets >= prompt gives stock vLLM's greedy tokens"] is False
    assert verdicts["headkv_compressed started and answered"] is False


@pytest.mark.slow
def test_eager_stage_passes_on_the_cpu(model_dir, tmp_path):
    cmd = [str(Path(sys.executable).with_name("headkv-vllm")), "node-check", "--stage", "eager",
           "--model", str(model_dir), "--dtype", "float32", "--stock-backend", "CPU_ATTN",
           "--kv-cache-bytes", str(2**30), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    result = json.loads((tmp_path / "node_check_eager.json").read_text())
    assert result["passed"] and len(result["checks"]) == 5
    assert "PASSED" in proc.stdout and "[ok] HEADKV with budgets >= prompt gives stock" in proc.stdout
    pool = result["servers"]["headkv_compressed"]["headkv_pool"]
    assert pool["kv_size"] == 128 and "SmolLM2-135M-Instruct_R2.json" in pool["budget_origin"]
