"""Every Triton kernel compiles for an H100 (sm_90) as its launcher launches it,
also on machines without a GPU (tests/support/kernels_compile_check.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = {
    "_window_lse_partial", "_window_prefix_scores", "_max_pool_rows",  # window_scores
    "_select_top_prefix", "_store_head_tokens",  # select_store
    "_decode_split", "_decode_merge",  # split_k_decode (paged, block-table and dense decode)
    "_append_token",  # append_decode_kv
}


@pytest.mark.slow  # about a minute of compiling on two cores
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parents[1] / "support" / "kernels_compile_check.py"
    proc = subprocess.run([sys.executable, str(script), "--arch", "90"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("COMPILED "))
    assert set(line.split()[1:1 + len(KERNELS)]) == KERNELS, line
