"""``headkv-vllm eval-ruler``: the generated tasks, their scoring and the options (fast),
and a small run through real servers, stock and HEADKV (slow)."""

import collections
import http.server
import json
import re
import subprocess
import sys
import threading

import pytest

from support.engines import ROOT
from headkv_vllm.tools.eval.ruler import (FORMAT, earlier_samples, main, parse_args, parse_max_tokens, summarize,
                                          summary_table)
from headkv_vllm.tools.eval.ruler_tasks import MAX_TOKENS, NIAH_SHAPE, TASKS, RulerTasks, score, word_list


@pytest.fixture(scope="module")
def tasks(tokenizer):
    return RulerTasks(tokenizer, seed=7)


def _user(sample) -> str:
    return sample.messages[0]["content"]


def _last_question(sample, opening: str) -> str:
    """The part of the user turn after the worked example: from the last ``opening`` on."""
    text = _user(sample)
    return text[text.rindex(opening):]


def test_word_list_has_single_lower_case_words():
    words = word_list()
    assert len(words) > 5000 and len(set(words)) == len(words)
    assert all(w.isalpha() and w.islower() for w in words)


@pytest.mark.parametrize("task", TASKS)
def test_samples_are_deterministic_per_seed_and_index(tokenizer, tasks, task):
    a = tasks.build(task, 1000, 0)
    assert RulerTasks(tokenizer, seed=7).build(task, 1000, 0) == a
    assert tasks.build(task, 1000, 1).outputs != a.outputs
    assert RulerTasks(tokenizer, seed=8).build(task, 1000, 0).outputs != a.outputs


@pytest.mark.parametrize("length", [1000, 4000])
@pytest.mark.parametrize("task", TASKS)
def test_prompt_is_at_most_the_length_and_close_to_it(tasks, task, length):
    sample = tasks.build(task, length, 3)
    n = tasks.count_tokens(sample.messages)
    # one unit below at most: an essay word, a noise line (~25 tokens) or a list word and its repeats
    assert length - 40 <= n <= length, n
    assert sample.messages[-1]["role"] == "assistant" and sample.metric == "all"
    assert sample.task == task and sample.length == length and sample.index == 3


def test_too_short_a_length_names_the_option(tasks):
    with pytest.raises(ValueError, match="--lengths: 200 tokens leave no room for task cwe"):
        tasks.build("cwe", 200, 0)


@pytest.mark.parametrize("task", list(NIAH_SHAPE))
def test_niah_values_are_in_the_essay_with_their_keys(tasks, task):
    num_keys, num_values, num_queries = NIAH_SHAPE[task]
    sample = tasks.build(task, 2000, 1)
    needles = re.findall(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", _user(sample))
    assert len(needles) == num_keys * num_values and len({k for k, _ in needles}) == num_keys
    values_of = collections.defaultdict(list)
    for key, value in needles:
        values_of[key].append(value)
    question = _user(sample).rsplit("\n", 1)[1]
    asked = [k for k in values_of if k in question]
    assert len(asked) == num_queries
    assert sorted(sample.outputs) == sorted(v for k in asked for v in values_of[k])
    assert all(k in sample.messages[1]["content"] for k in asked)


def test_vt_chain_assigns_the_value_to_every_expected_variable(tasks):
    sample = tasks.build("vt", 2000, 2)
    question = _last_question(sample, "Memorize and track")
    value = re.search(r"assigned the value (\d{5}) in the text above", question)[1]
    holds = {}
    for name, source in re.findall(r"^VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d{5})$", question, re.MULTILINE):
        holds[name] = source if source.isdigit() else holds[source[4:]]  # a chain's lines come in order
    assert len(holds) == 5
    assert sorted(n for n, v in holds.items() if v == value) == sorted(sample.outputs)
    assert f"5 variables are assigned the value {value}" in sample.messages[1]["content"]


@pytest.mark.parametrize("length", [1000, 5000])
def test_cwe_expected_words_are_strictly_the_most_common(tasks, length):
    sample = tasks.build("cwe", length, 0)
    question = _last_question(sample, "Below is a numbered list of words.")
    entries = re.findall(r"\d+\. ([a-z]+)", question)
    counts = collections.Counter(entries)
    assert len(sample.outputs) == 10 and set(sample.outputs) <= set(counts)
    least_common = min(counts[w] for w in sample.outputs)
    assert all(c < least_common for w, c in counts.items() if w not in sample.outputs)
    assert least_common == (6 if length < 4096 else 30)
    assert not any(a in b for a in sample.outputs for b in counts if a != b)  # no substring credit


def test_fwe_expected_words_are_the_three_most_frequent_after_the_noise(tasks):
    sample = tasks.build("fwe", 2000, 4)
    text = _user(sample).split("coded words. ", 1)[1].split("\nQuestion:", 1)[0]
    ranked = [w for w, _ in collections.Counter(text.split()).most_common()]
    counts = collections.Counter(text.split())
    assert ranked[0] == "..." and ranked[1:4] == sample.outputs
    assert counts[sample.outputs[2]] > max(c for w, c in counts.items() if w not in ["...", *sample.outputs])


def test_scoring_is_rulers_string_match():
    expected = ["1234567", "7654321", "1111111", "2222222"]
    assert score("The numbers are 1234567, 7654321, 1111111 and 2222222.", expected, "all") == 1.0
    assert score("1234567 and 7654321", expected, "all") == 0.5
    assert score("no idea", expected, "all") == 0.0
    assert score("ALBATROSS", ["albatross"], "all") == 1.0
    assert score("only 1111111", expected, "part") == 1.0 and score("none", expected, "part") == 0.0
    with pytest.raises(ValueError, match="metric"):
        score("x", ["x"], "exact")


def test_max_tokens_per_task():
    assert parse_max_tokens("", ["cwe", "vt"]) == {"cwe": MAX_TOKENS["cwe"], "vt": MAX_TOKENS["vt"]}
    assert parse_max_tokens("16", ["cwe", "vt"]) == {"cwe": 16, "vt": 16}
    assert parse_max_tokens("cwe=64,fwe=8", ["cwe", "vt"]) == {"cwe": 64, "vt": MAX_TOKENS["vt"]}


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "niah_single,qa_1"], "--tasks: unknown task(s) qa_1"),
    (["--tasks", ","], "--tasks: unknown task(s) (none)"),
    (["--lengths", "4000,abc"], "--lengths"),
    (["--lengths", "64"], "--lengths: give integers >= 128"),
    (["--samples", "0"], "--samples"),
    (["--max-tokens", "cwe=0"], "--max-tokens"),
    (["--max-tokens", "cwee=10"], "--max-tokens: 'cwee=10' is not TASK=N"),
    (["--methods", "full,h2o"], "--methods: unknown method"),
    (["--base-url", "http://x", "--methods", "snapkv", "--kv-sizes", "64,128"], "--base-url"),
])
def test_bad_options_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_defaults_are_all_tasks_at_4000_tokens():
    args = parse_args([])
    assert args.task_list == list(TASKS) and args.length_list == [4000] and args.max_tokens_of == MAX_TOKENS


def _row(task, length, index, value):
    return {"task": task, "length": length, "index": index, "score": value, "fingerprint": f"{task}{index}"}


def _runs():
    full = [_row("niah_single", 1000, 0, 1.0), _row("cwe", 1000, 0, 0.5), _row("niah_single", 2000, 0, 1.0),
            _row("cwe", 2000, 0, 0.7)]
    snap = [_row("niah_single", 1000, 0, 1.0), _row("cwe", 1000, 0, 0.1), _row("niah_single", 2000, 0, 0.0),
            _row("cwe", 2000, 0, 0.1)]
    return [{"method": "snapkv", "kv_size": 64, "label": "SnapKV @ 64", "headkv": {"kv_size": 64}, "samples": snap},
            {"method": "full", "kv_size": None, "label": "Full cache", "headkv": None, "samples": full}]


def test_summary_averages_tasks_and_is_relative_to_the_full_cache():
    full, snap = summarize(_runs(), ["niah_single", "cwe"])  # the full cache first
    assert full["tasks"] == pytest.approx({"niah_single": 100.0, "cwe": 60.0}) and full["average"] == pytest.approx(80)
    assert snap["tasks"] == pytest.approx({"niah_single": 50.0, "cwe": 10.0}) and snap["average"] == pytest.approx(30)
    assert snap["average_pct_of_full"] == pytest.approx(37.5) and full["average_pct_of_full"] == pytest.approx(100)
    assert snap["by_length"] == pytest.approx({"1000": 55.0, "2000": 5.0})
    table = summary_table([full, snap], ["niah_single", "cwe"]).splitlines()
    assert table[0] == ("| method | KV size | niah_single | cwe | average | % of full | average, 1000 tokens | "
                        "average, 2000 tokens |")
    assert table[2] == "| Full cache | full | 100.0 | 60.0 | 80.0 | 100% | 75.0 | 85.0 |"
    assert table[3] == "| SnapKV | 64 | 50.0 | 10.0 | 30.0 | 38% | 55.0 | 5.0 |"


def test_summary_figures(tmp_path):
    from headkv_vllm.tools.common.plots import ruler_task_heatmap, score_vs_kv_plot

    result = {"model": "m", "grid": {"tasks": ["niah_single", "cwe"]}, "summary": summarize(_runs(), ["niah_single", "cwe"])}
    for png in (score_vs_kv_plot(result["summary"], "average", "average", "t", tmp_path / "summary.png"),
                ruler_task_heatmap(result, tmp_path / "tasks.png")):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_keeps_samples_of_the_same_model_and_request(tmp_path):
    earlier = {"format": FORMAT, "model": "m", "runs": _runs()}
    path = tmp_path / "ruler.json"
    path.write_text(json.dumps(earlier))
    now = {"model": "m"}
    fingerprints = {("niah_single", 1000, 0): "niah_single0", ("cwe", 1000, 0): "changed"}
    run, rows = earlier_samples(path, now, fingerprints)[("snapkv", 64)]
    assert run["label"] == "SnapKV @ 64" and list(rows) == [("niah_single", 1000, 0)]
    assert earlier_samples(path, {"model": "other"}, fingerprints) == {}
    assert earlier_samples(tmp_path / "absent.json", now, fingerprints) == {}


def test_fingerprint_follows_the_request(tasks):
    sample = tasks.build("niah_single", 1000, 0)
    assert sample.fingerprint(128) == tasks.build("niah_single", 1000, 0).fingerprint(128)
    assert sample.fingerprint(128) != sample.fingerprint(64)


def test_cli_lists_eval_ruler(capsys):
    from headkv_vllm.cli import main

    assert main(["--help"]) == 0 and "eval-ruler" in capsys.readouterr().out


class _EchoServer(http.server.ThreadingHTTPServer):
    """A stand-in for an OpenAI-compatible server: answers every chat with its user
    turn (so every expected string is found) and counts the requests."""

    def __init__(self):
        self.asked: list[str] = []
        super().__init__(("127.0.0.1", 0), _EchoHandler)


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self._reply({"object": "list", "data": [{"id": "echo", "object": "model", "created": 0, "owned_by": "t"}]})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.asked.append(request["messages"][0]["content"])
        self._reply({"id": "c", "object": "chat.completion", "created": 0, "model": "echo",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": request["messages"][0]["content"]}}],
                     "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})

    def _reply(self, body: dict):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_run_and_resume_against_a_running_server(model_dir, tmp_path):
    server = _EchoServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "ruler"
    argv = ["--base-url", f"http://127.0.0.1:{server.server_address[1]}", "--methods", "full", "--model",
            str(model_dir), "--tasks", "niah_multivalue,fwe", "--lengths", "600", "--samples", "2", "--out", str(out)]
    try:
        assert main(argv) == 0
        result = json.loads((out / "ruler.json").read_text())
        (run,) = result["runs"]
        assert run["server"] == {"base_url": argv[1]} and run["headkv"] is None
        assert [(r["task"], r["index"], r["score"]) for r in run["samples"]] == [
            ("niah_multivalue", 0, 1.0), ("niah_multivalue", 1, 1.0), ("fwe", 0, 1.0), ("fwe", 1, 1.0)]
        assert result["grid"]["max_tokens"] == {"niah_multivalue": 128, "fwe": 50}
        assert "| Full cache | full | 100.0 | 100.0 | 100.0 | 100% |" in (out / "summary.md").read_text()
        assert len(server.asked) == 4

        # one more sample per task, and fwe's answer length changed: its earlier answers are asked again
        argv[argv.index("--samples") + 1] = "3"
        assert main(argv + ["--max-tokens", "fwe=20", "--resume"]) == 0
        run = json.loads((out / "ruler.json").read_text())["runs"][0]
        assert [(r["task"], r["index"]) for r in run["samples"]] == [(t, i) for t in ("niah_multivalue", "fwe")
                                                                      for i in range(3)]
        assert len(server.asked) == 4 + 1 + 3
    finally:
        server.shutdown()


def test_eval_needle_runs_on_the_shared_pieces(model_dir, tmp_path):
    """eval-needle goes through the same server, request and --resume code (eval_runs)."""
    from headkv_vllm.tools.eval import needle as eval_needle

    server = _EchoServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    argv = ["--base-url", f"http://127.0.0.1:{server.server_address[1]}", "--methods", "full", "--model",
            str(model_dir), "--needles", "ship-name,vault-code", "--lengths", "300", "--depths", "0,100",
            "--out", str(tmp_path)]
    try:
        assert eval_needle.main(argv) == 0 and eval_needle.main(argv + ["--resume"]) == 0
        (run,) = json.loads((tmp_path / "needle.json").read_text())["runs"]
        assert len(run["cells"]) == 4 and all(c["contains"] for c in run["cells"]) and len(server.asked) == 4
    finally:
        server.shutdown()


@pytest.mark.slow
def test_small_run_through_real_servers(model_dir, tmp_path):
    out = tmp_path / "ruler"
    cmd = [sys.executable, "-m", "headkv_vllm.cli", "eval-ruler", "--model", str(model_dir),
           "--methods", "full,snapkv", "--kv-sizes", "32", "--lengths", "600", "--tasks", "niah_single,vt",
           "--samples", "1", "--max-tokens", "24", "--kv-cache-bytes", str(2**30), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "ruler.json").read_text())
    assert result["format"] == FORMAT and result["machine"]["git_commit"]
    assert [(r["method"], r["kv_size"]) for r in result["runs"]] == [("full", None), ("snapkv", 32)]
    full, snap = result["runs"]
    assert [(s["task"], s["length"], s["index"]) for s in full["samples"]] == [("niah_single", 600, 0), ("vt", 600, 0)]
    assert all(560 <= s["prompt_tokens"] <= 603 and 0 <= s["score"] <= 1 for s in full["samples"] + snap["samples"])
    assert snap["server"]["headkv_pool"]["kv_size"] == 32 and full["server"]["headkv_pool"] is None
    assert "| SnapKV | 32 |" in (out / "summary.md").read_text()
    for png in ("summary.png", "tasks.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --resume with one more sample per task: only the two new samples are asked, on one server.
    cmd[cmd.index("--samples") + 1] = "2"
    cmd[cmd.index("--methods") + 1] = "full"
    proc = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    widened = json.loads((out / "ruler.json").read_text())["runs"][0]
    assert len(widened["samples"]) == 4 and [s for s in widened["samples"] if s["index"] == 0] == full["samples"]
    assert "2/2" in proc.stderr and "4/4" not in proc.stderr
