"""`headkv-vllm sched-sim --quick`: vLLM's real scheduler with stock blocks and with
HEADKV head pages, same pool bytes, no model. Structure only, no timing assertions."""

import json

import pytest

from headkv_vllm.cli import COMMANDS, main as cli_main
from headkv_vllm.tools.sim.sched_sim import MODELS, VARIANTS


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("sched_sim")
    assert cli_main(["sched-sim", "--quick", "--out", str(out), "--name", "q"]) == 0
    return json.loads((out / "q.json").read_text()), (out / "q.md").read_text()


def test_registered():
    assert COMMANDS["sched-sim"][0] == "headkv_vllm.tools.sim.sched_sim"


def test_every_model_and_setup_present(quick):
    result, md = quick
    got = {(r["model"], r["variant"]) for r in result["records"]}
    assert got == {(m, v) for m in MODELS for v in VARIANTS}
    assert result["settings"]["quick"] is True
    assert result["command"].startswith("headkv-vllm sched-sim --quick")
    assert len(result["load_average_start"]) == 3 and result["machine"]["versions"]["vllm"]
    assert "| llama3-8b | headkv |" in md and "HEADKV / stock" in md


def test_pool_sizes(quick):
    result, _ = quick
    pool_bytes = 512 * 2**20
    for r in result["records"]:
        shape, p = MODELS[r["model"]], r["pool"]
        assert p["kv_cache_bytes"] == pool_bytes
        layer_page = 16 * shape.kv_heads_per_rank * shape.head_dim * 2 * 2  # tokens x KV heads x dim x (K, V) x bf16
        if r["variant"] == "headkv":
            assert r["engine"]["kv_cache_manager_class"] == "HeadKVManager"
            assert p["num_kv_cache_groups"] == shape.num_layers
            assert p["block_bytes"] == 16 * shape.head_dim * 2 * 2  # one head page: one KV head of one layer
            assert p["num_blocks"] == pool_bytes // p["block_bytes"]
            assert not r["engine"]["enable_prefix_caching"] and r["engine"]["enable_chunked_prefill"]
        else:
            assert p["num_kv_cache_groups"] == 1
            assert p["block_bytes"] == layer_page * shape.num_layers  # all KV heads of all layers
            assert p["num_blocks"] == pool_bytes // p["block_bytes"]
        assert p["free_blocks_at_start"] == p["num_blocks"] - 1  # block 0 is vLLM's null block
        assert p["build_scheduler_s"] > 0
    by = {(r["model"], r["variant"]): r["pool"]["num_blocks"] for r in result["records"]}
    # Same bytes: head pages outnumber stock blocks by layers x KV heads per rank.
    assert by[("llama3-8b", "headkv")] == 256 * by[("llama3-8b", "stock")]


def test_requests_are_scheduled_and_decode(quick):
    result, _ = quick
    for r in result["records"]:
        assert [run["requests"] for run in r["runs"]] == result["settings"]["request_list"]
        for run in r["runs"]:
            n = run["requests"]
            assert run["num_running"] == n and run["num_waiting"] == 0
            assert run["prefill"]["steps"] >= 1 and run["prefill"]["schedule"]["median_ms"] > 0
            dec = run["decode"]
            assert dec["steps"] == result["settings"]["decode_steps"]
            assert dec["schedule"]["median_ms"] > 0 and dec["update_from_output"]["median_ms"] > 0
            assert dec["schedule"]["p90_ms"] >= dec["schedule"]["median_ms"]
            assert run["generated_tokens_min"] >= dec["steps"]
            # The pool holds exactly what the layout says, and gets it all back on abort.
            assert run["blocks_held_at_end"] == run["blocks_expected_at_end"] > 0
            assert run["free_blocks_after_abort"] == r["pool"]["free_blocks_at_start"]


def test_ratios(quick):
    result, _ = quick
    rows = {(row["model"], row["against"]): row for row in result["ratios"]}
    assert set(rows) == {(m, v) for m in MODELS for v in ("stock", "stock-plain")}
    for row in rows.values():
        assert row["num_blocks"] > 1
        assert [p["requests"] for p in row["per_requests"]] == result["settings"]["request_list"]
        assert all(p["decode_schedule_median"] > 0 for p in row["per_requests"])


def test_page_tables_measured_on_vllms_block_tables(quick):
    """The runner's tables (vLLM's MultiGroupBlockTable, fed each step's scheduler output):
    every decode step commits rows [:requests] of every group's table at full width."""
    result, md = quick
    max_len, seqs = result["settings"]["max_model_len"], result["settings"]["max_num_seqs"]
    for r in result["records"]:
        shape, tables = MODELS[r["model"]], r["page_tables"]
        if r["variant"] == "headkv":
            assert tables["tables"] == shape.num_layers
            assert tables["width"] >= shape.kv_heads_per_rank * (max_len // 16 + 1)
        else:
            assert tables["tables"] == 1 and tables["width"] >= max_len // 16
        row_bytes = tables["tables"] * tables["width"] * 4  # int32, every group
        assert tables["device_bytes"] == seqs * row_bytes + tables["tables"] * result["settings"][
            "max_num_batched_tokens"] * 8  # block tables + int64 slot mappings
        for run in r["runs"]:
            assert run["decode"]["page_table_h2d_bytes_mean"] == run["decode"]["page_table_h2d_bytes_max"] \
                == run["requests"] * row_bytes
    assert "H2D KiB/step" in md and "table device memory" in md


def test_own_kv_sizes_are_asked_and_counted(quick):
    """Requests 1 and 3 of every 4 ask for their own KV size; the pool holds what their own
    budgets need (test_requests_are_scheduled_and_decode checks held == expected)."""
    from headkv_vllm.tools.sim.sched_sim import _own_kv_size

    result, _ = quick
    spec = {"own_kv_sizes": result["settings"]["own_kv_size_list"]}
    assert spec["own_kv_sizes"] == [64, 256]
    assert [_own_kv_size("headkv", spec, i) for i in range(5)] == [None, 64, None, 256, None]
    assert _own_kv_size("stock", spec, 1) is None
