"""``headkv-vllm stress``: the seeded workload, the judgement of answers, the verdict
and drift, and a short real run against a HEADKV server (slow)."""

import json

import pytest

from headkv_vllm.tools.stress.run import ABORT_LINE, PREFILL_LINE, engine_request_ids, main, parse_args, stress_table, verdict
from headkv_vllm.tools.stress.client import _judge_completion, _judge_rejection, chunk_tokens, parse_chunk
from headkv_vllm.tools.stress.watch import drift, finished_requests
from headkv_vllm.tools.stress.workload import KINDS, Job, Mix, make_jobs

IDS = list(range(100, 20100))
TEXT = "word " * 5000


def jobs(n=300, seed=0, **kw):
    return make_jobs(n, seed, model="m", haystack_ids=IDS, haystack_text=TEXT, max_model_len=1024, vocab_size=50000,
                     window=8, **kw)


def test_jobs_are_seeded_and_mix_every_kind():
    a, b, c = jobs(seed=1), jobs(seed=1), jobs(seed=2)
    assert [(j.kind, j.body, j.raw) for j in a] == [(j.kind, j.body, j.raw) for j in b]
    assert [(j.kind, j.body) for j in a] != [(j.kind, j.body) for j in c]
    assert {j.kind for j in a} == set(KINDS)
    assert len({j.malformed for j in a if j.malformed}) >= 8
    kv = {j.kv_size for j in a if j.kind != "malformed"}
    assert {None, 32, "full"} <= kv
    for j in a:
        if j.kind in ("complete", "disconnect"):
            assert 16 <= len(j.body["prompt"]) <= 1024 - 64 - 8
            assert j.body["request_id"] == j.request_id and j.body["ignore_eos"]
        if j.kind == "disconnect":
            assert j.stream and (0 < j.after_tokens < j.max_tokens or (j.after_tokens == 0 and j.delay_s > 0))
        if j.kv_size is not None and j.kind != "malformed":
            assert j.body["vllm_xargs"] == {"headkv_kv_size": j.kv_size}
    assert [j.index for j in jobs(5, first_index=40)] == [40, 41, 42, 43, 44]


def test_stock_jobs_are_the_same_without_kv_sizes():
    with_sizes, stock = jobs(seed=3), jobs(seed=3, kv_sizes=False)
    assert all(j.kv_size is None and "vllm_xargs" not in (j.body or {}) for j in stock if j.kind != "malformed")
    assert [(j.kind, (j.body or {}).get("prompt")) for j in stock] == [(j.kind, (j.body or {}).get("prompt"))
                                                                       for j in with_sizes]


def test_mix_weights_choose_the_kinds():
    only = jobs(50, mix=Mix(complete=0, chat=0, disconnect=0, malformed=1))
    assert {j.kind for j in only} == {"malformed"}


def test_answers_are_judged():
    job = Job(0, "complete", "/v1/completions", {}, max_tokens=5)
    out = {}
    _judge_completion(job, 5, "length", out)
    assert out["outcome"] == "completed"
    out = {}
    _judge_completion(job, 4, "stop", out)
    assert "outcome" not in out and "4 of 5" in out["detail"]
    bad = Job(1, "malformed", "/v1/completions", {}, malformed="kv", field="vllm_xargs.headkv_kv_size")
    for status, text, ok in ((400, "vllm_xargs.headkv_kv_size must be", True), (400, "bad request", False),
                             (500, "vllm_xargs.headkv_kv_size", False), (200, "{}", False)):
        out = {}
        _judge_rejection(bad, status, text, out)
        assert (out.get("outcome") == "rejected") == ok, (status, text)


def test_stream_chunks_count_tokens():
    assert parse_chunk("data: [DONE]") is None and parse_chunk(": keep-alive") is None
    completion = parse_chunk('data: {"choices": [{"index": 0, "text": " the", "finish_reason": null}]}')
    assert chunk_tokens(completion, 3) == 4
    role = {"choices": [{"delta": {"role": "assistant", "content": ""}}], "usage": {"completion_tokens": 0}}
    assert chunk_tokens(role, 0) == 0
    # a busy server merges tokens into one chunk; its running usage says how many
    merged = {"choices": [{"delta": {"content": " a b c"}}], "usage": {"completion_tokens": 7}}
    assert chunk_tokens(merged, 4) == 7
    assert chunk_tokens({"choices": [], "usage": {"completion_tokens": 9}}, 7) == 9


def test_request_ids_from_the_server_log():
    """The engine log's lines as vLLM 0.32 and HEADKV write them (ids: ours inside vLLM's)."""
    log = "\n".join([
        "(EngineCore pid=1) INFO 12-02 13:01:02 [step_planner.py:105] HeadKV request cmpl-stress-2-complete-0-9410326f: "
        "prompt 900 tokens, kept 130.0 per KV head on average over all layers (14.4%).",
        "INFO 12-02 13:01:03 [async_llm.py:922] Aborted request(s) cmpl-stress-17-disconnect-0-1a2b3c4d.",
        "INFO 12-02 13:01:03 [async_llm.py:922] Aborted request(s) chatcmpl-stress-23-chat-abcdef01,cmpl-stress-5-disconnect-0-00000000.",
        "INFO 12-02 13:01:04 [async_llm.py:922] Aborted request(s) cmpl-stress-probe-3-0-1234abcd.",
    ])
    assert engine_request_ids(log, PREFILL_LINE) == {"stress-2"}
    assert engine_request_ids(log, ABORT_LINE) == {"stress-17", "stress-23", "stress-5"}


def test_finished_requests_count_full_answers_only():
    text = "\n".join([
        '# TYPE vllm:request_success_total counter',
        'vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 3.0',
        'vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 5.0',
        'vllm:request_success_total{engine="0",finished_reason="abort",model_name="m"} 7.0',
        'vllm:request_success_total{engine="0",finished_reason="error",model_name="m"} 1.0',
        'vllm:request_success_total{engine="1",finished_reason="length",model_name="m"} 2.0',
    ])
    assert finished_requests(text) == 10.0
    assert finished_requests("vllm:num_requests_running 0.0") is None


def _result(checkpoints, failed=0, http_5xx=0, alive=True, preemptions=3, finished=10, not_aborted=0, log_errors=()):
    summary = {"outcomes": {"completed": 10, "failed": failed}, "http_5xx": http_5xx, "preemptions": preemptions,
               "failures": [{"detail": "HTTP 500"}] * failed, "requests": 10 + failed, "duration_s": 60.0,
               "requests_per_s": 0.2, "cancelled_before_first_token": 0, "cancelled_after_prefill_began": 0,
               "cancelled_mid_decode": 0, "malformed": {"unknown model": {"404": 2}}, "engine_finished": finished,
               "cancelled_not_aborted": not_aborted, "server_log_error_lines": log_errors}
    result = {"summary": summary, "checkpoints": checkpoints, "server_alive_at_end": alive,
              "drift": drift(checkpoints, 60), "settings": {"concurrency": 4, "headkv": {"kv_size": 128}}, "kv_cache_bytes": 2**24,
              "model": "m", "samples": [{"t": c["t"], "rss_mib": c["rss_mib"], "pages_in_use": 5.0, "running": 1.0,
                                         "waiting": 0.0} for c in checkpoints], "server": {}}
    result["verdict"] = verdict(result)
    return result


def _checkpoint(t, rss, pages=0.0, idle=True):
    return {"t": t, "round": int(t // 60), "requests_done": int(t), "idle": idle, "running": 0.0 if idle else 2.0, "waiting": 0.0,
            "kv_usage": pages / 1000, "pages_in_use": pages, "preemptions": 3.0, "probe_status": 200, "error": None,
            "rss_mib": {"total": rss, "worker": rss / 2, "engine_core": rss / 4, "api_server": rss / 4}}


def test_verdict_and_drift(tmp_path):
    from headkv_vllm.tools.common.plots import stress_plot

    clean = _result([_checkpoint(t, 1000 + t / 60) for t in (0, 60, 120, 180, 3660)])
    assert clean["verdict"]["passed"] and clean["verdict"]["problems"] == []
    d = clean["drift"]
    assert d["checkpoints_after_warmup"] == 4 and d["pages_in_use_at_idle_max"] == 0
    assert d["rss_total_drift_pct"] == pytest.approx(100 * 60 / 1001)
    assert d["rss_total_slope_mib_per_hour"] == pytest.approx(60.0)
    assert clean["verdict"]["rss_drift_target_met"] is False
    assert "1000" in stress_table(clean) or "1001" in stress_table(clean)
    assert stress_plot(clean, tmp_path / "s.png").stat().st_size > 10_000

    # --render recomputes drift and verdict of a stored result and redraws it
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**clean, "format": "headkv-stress/1"}))
    assert main(["--render", str(path), "--warmup-minutes", "0"]) == 0
    assert json.loads(path.read_text())["drift"]["checkpoints_after_warmup"] == 5
    assert (tmp_path / "r.png").exists() and (tmp_path / "r.md").exists()
    assert main(["--compare", str(path), str(path), "--out", str(tmp_path), "--name", "cmp"]) == 0
    assert (tmp_path / "cmp.png").stat().st_size > 10_000
    (tmp_path / "bad.json").write_text("{}")
    assert main(["--render", str(tmp_path / "bad.json")]) == 2

    leaked = _result([_checkpoint(0, 1000), _checkpoint(60, 1000, pages=90.0)])
    assert not leaked["verdict"]["passed"] and "head pages in use=90.0" in leaked["verdict"]["problems"][0]
    busy = _result([_checkpoint(0, 1000), _checkpoint(60, 1000, idle=False)])
    assert not busy["verdict"]["passed"]
    for bad in (_result([_checkpoint(0, 1000)], failed=1), _result([_checkpoint(0, 1000)], http_5xx=1),
                _result([_checkpoint(0, 1000)], alive=False)):
        assert not bad["verdict"]["passed"]
    # 10 completed: the engine must have finished 10 (+ cancelled ones that finished anyway)
    assert not _result([_checkpoint(0, 1000)], finished=9)["verdict"]["passed"]
    assert not _result([_checkpoint(0, 1000)], finished=11)["verdict"]["passed"]  # no cancelled request to explain it
    assert not _result([_checkpoint(0, 1000)], log_errors=["ERROR boom"])["verdict"]["passed"]
    assert _result([_checkpoint(0, 1000)], preemptions=0)["verdict"]["notes"]
    assert "fewer than two" in _result([_checkpoint(0, 1000)])["drift"]["note"]


def test_bad_options_are_named(capsys):
    for argv, words in ((["--mix", "1,2"], "--mix"), (["--mix", "1,a,1,1"], "--mix"), (["--mix", "0,0,0,0"], "--mix"),
                        (["--pool-fits", "0.5"], "--pool-fits"), (["--method", "stock"], "--method"),
                        (["--requests", "0"], "--requests"), (["--max-model-len", "100"], "--max-model-len")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert words in capsys.readouterr().err
    assert parse_args(["--mix", "1,0,0,1"]).mix_weights == Mix(1, 0, 0, 1)


@pytest.mark.slow
def test_short_stress_run_leaks_nothing(model_dir, tmp_path):
    """A few dozen requests of every kind against a real HEADKV server whose pool forces
    preemption: every request completed, was cancelled or was rejected 4xx, and the
    server was idle with no head page in use after each round."""
    rc = main(["--model", str(model_dir), "--requests", "48", "--round-size", "24", "--concurrency", "24",
               "--max-model-len", "1024", "--pool-fits", "1.0", "--warmup-minutes", "0", "--sample-s", "1",
               "--out", str(tmp_path), "--name", "short"])
    result = json.loads((tmp_path / "short.json").read_text())
    s = result["summary"]
    assert rc == 0, result["verdict"]
    assert s["requests"] == 48 and s["http_5xx"] == 0 and s["outcomes"].get("failed", 0) == 0
    assert set(s["by_kind"]) == set(KINDS)
    assert s["outcomes"]["cancelled"] > 0 and s["outcomes"]["rejected"] > 0 and s["outcomes"]["completed"] > 0
    assert len(result["checkpoints"]) == 3
    assert all(c["idle"] and c["pages_in_use"] == 0 for c in result["checkpoints"])
    assert s["preemptions"] > 0, "the 1-request pool should have forced preemption"
    assert result["samples"] and max(x.get("pages_in_use") or 0 for x in result["samples"]) > 0
    assert all(x["rss_mib"]["engine_core"] > 0 and x["rss_mib"]["total"] > 1000 for x in result["samples"])
    assert s["cancelled_aborted_by_engine"] > 0 and s["server_log_error_lines"] == []
    assert (tmp_path / "short.png").exists() and "| completed |" in (tmp_path / "short.md").read_text()


def test_per_request_sizes_stay_above_a_wide_window():
    wide = make_jobs(300, 0, model="m", haystack_ids=IDS, haystack_text=TEXT, max_model_len=1024, vocab_size=50000,
                     window=32)
    sizes = {j.kv_size for j in wide if j.kind != "malformed" and isinstance(j.kv_size, int)}
    assert 64 in sizes and min(sizes) > 32
