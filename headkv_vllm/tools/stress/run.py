"""``headkv-vllm stress``: load, faults and bad input against a real HEADKV server on
the loopback interface, then a check that nothing leaked.

Starts ``vllm serve`` (HEADKV) on 127.0.0.1 with a KV pool small enough to force
preemption, and sends rounds of requests, ``--concurrency`` at a time, generated
from ``--seed``: prompt lengths 16-1500 tokens, 1-64 output tokens, per-request KV
sizes (``vllm_xargs.headkv_kv_size``: the server's, 32 ... 1024, "full"), streamed
and whole, completions and chat, client disconnects before the first token and
mid-decode, and malformed requests. After each round it waits until the server is
idle and records a checkpoint: running and waiting requests, head pages in use and
the RSS of the server's processes. The RSS is also sampled through the run.

It fails (exit 1) if any well-formed request was not answered in full, any malformed
one was not answered 4xx, any answer was a 5xx, any cancelled request was neither
aborted by the engine (its request log) nor finished, the server logged an error, or
any checkpoint found pages in use, requests running or waiting, or the server gone.
``--method full`` runs the same requests on stock vLLM. Stops by itself: after
``--requests`` requests or ``--minutes`` minutes, whichever comes first. Writes
``<name>.json``, ``<name>.md`` and ``<name>.png``.

    headkv-vllm stress --requests 1000 --name stress_1000
    headkv-vllm stress --minutes 30 --requests 100000 --name soak_30min   # soak: RSS and page drift
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

from headkv_vllm.tools.common.methods import FULL, METHODS, MethodError, build_methods, model_identity

FORMAT = "headkv-stress/1"
RSS_DRIFT_TARGET_PCT = 2.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="headkv-vllm stress", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct", help="local model folder (served as is)")
    p.add_argument("--method", default="headkv-r2", help="the server's HEADKV method: "
                   + ", ".join(m for m in METHODS if m != FULL)
                   + "; or full: stock vLLM, no per-request KV sizes (the same workload otherwise, to compare memory)")
    p.add_argument("--kv-size", type=int, default=128, help="the server's KV size (requests may choose their own)")
    p.add_argument("--requests", type=int, default=1000, help="stop after this many requests (default 1000)")
    p.add_argument("--minutes", type=float, default=120.0,
                   help="stop after this many minutes (default 120; a soak sets it and a large --requests)")
    p.add_argument("--round-size", type=int, default=100, help="requests between idle checkpoints (default 100)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at once (default 32)")
    p.add_argument("--max-output", type=int, default=64, help="most output tokens of a request (default 64)")
    p.add_argument("--max-model-len", type=int, default=2048, help="the server's --max-model-len (default 2048)")
    p.add_argument("--pool-fits", type=float, default=1.2,
                   help="KV pool size in uncompressed max-length requests (default 1.2: forces preemption)")
    p.add_argument("--mix", default="0.55,0.15,0.2,0.1",
                   help="weights of complete, chat, disconnect and malformed requests (default 0.55,0.15,0.2,0.1)")
    p.add_argument("--warmup-minutes", type=float,
                   help="checkpoints before this are left out of the drift (default 5; --render: the file's)")
    p.add_argument("--sample-s", type=float, default=2.0, help="RSS and gauge sampling interval (default 2 s)")
    p.add_argument("--request-timeout", type=float, default=900.0, help="seconds before a request counts as failed")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--render", metavar="JSON", help="no run: recompute drift (with --warmup-minutes) and verdict of "
                   "a result file, and rewrite it with its table and plot")
    p.add_argument("--compare", metavar="JSON", nargs="+", help="no run: plot the server's RSS per process against "
                   "requests done for these result files (one line each, named by file) to <out>/<name>.png")
    p.add_argument("--name", default="stress", help="file stem of the outputs")
    p.add_argument("--out", default="results/stress", help="output folder")
    args = p.parse_args(argv)
    if args.method not in METHODS:
        p.error(f"--method: {args.method!r} is not a method; use one of {', '.join(METHODS)}.")
    from headkv_vllm.tools.stress.workload import Mix

    try:
        weights = [float(v) for v in args.mix.split(",")]
    except ValueError:
        weights = []
    if len(weights) != 4:
        p.error(f"--mix: give four comma-separated weights (complete, chat, disconnect, malformed); got {args.mix!r}.")
    args.mix_weights = Mix(*weights)
    if min(args.mix_weights.weights()) < 0 or sum(args.mix_weights.weights()) <= 0:
        p.error(f"--mix: weights must be >= 0 and not all 0; got {args.mix!r}.")
    for name in ("requests", "round_size", "concurrency", "max_output"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1.")
    if not args.minutes > 0 or not args.pool_fits >= 1.0:
        p.error("--minutes must be > 0 and --pool-fits >= 1 (vLLM needs room for one max-length request).")
    if args.max_model_len < args.max_output + 64:
        p.error(f"--max-model-len must be at least --max-output + 64 ({args.max_output + 64}).")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.compare:
        from headkv_vllm.tools.common.plots import stress_compare_plot

        results = {Path(f).stem: json.loads(Path(f).read_text()) for f in args.compare}
        print(f"wrote {stress_compare_plot(results, Path(args.out) / f'{args.name}.png')}")
        return 0
    if args.render:
        return render(Path(args.render), None if args.warmup_minutes is None else 60 * args.warmup_minutes)
    if args.warmup_minutes is None:
        args.warmup_minutes = 5.0
    try:
        model = model_identity(args.model)
        method = build_methods([args.method], [args.kv_size], model, {})[0]
    except MethodError as e:
        print(f"headkv-vllm stress: error: {e}", file=sys.stderr)
        return 2
    from headkv_vllm.method.config import HeadKVConfig

    # the served window: a score file's calibrated one when the method sets none
    window = method.served["window"] if method.served else HeadKVConfig().window
    result = run(args, model, method, window, "headkv-vllm stress " + shlex.join(argv))
    return write_outputs(result, Path(args.out) / f"{args.name}.json")


def write_outputs(result: dict, json_path: Path) -> int:
    from headkv_vllm.tools.common.plots import stress_plot

    json_path.write_text(json.dumps(result, indent=1))
    table = stress_table(result)
    json_path.with_suffix(".md").write_text(table + "\n")
    png = stress_plot(result, json_path.with_suffix(".png"))
    print(table)
    print(f"wrote {json_path}, {json_path.with_suffix('.md')}, {png}")
    return 0 if result["verdict"]["passed"] else 1


def render(json_path: Path, warmup_s: float | None) -> int:
    """Drift and verdict of a stored result recomputed (the measurements are kept)."""
    from headkv_vllm.tools.stress.watch import drift

    try:
        result = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"headkv-vllm stress: error: --render {json_path}: {e}", file=sys.stderr)
        return 2
    if result.get("format") != FORMAT:
        print(f"headkv-vllm stress: error: --render {json_path}: not a {FORMAT} result", file=sys.stderr)
        return 2
    result["drift"] = drift(result["checkpoints"], result["drift"]["warmup_s"] if warmup_s is None else warmup_s)
    result["verdict"] = verdict(result)
    return write_outputs(result, json_path)


def pool_bytes(model, max_model_len: int, fits: float) -> int:
    """KV-cache bytes for ``fits`` uncompressed max-length requests, plus vLLM's null page."""
    from headkv_vllm.engine.settings import DEFAULT_BLOCK_SIZE as BLOCK
    from headkv_vllm.tools.bench.measure import DTYPE_BYTES

    pages = math.ceil(fits * model.num_layers * model.num_kv_heads * -(-max_model_len // BLOCK)) + 1
    return pages * 2 * BLOCK * model.head_dim * DTYPE_BYTES


def run(args: argparse.Namespace, model, method, window: int, command: str) -> dict:
    from transformers import AutoTokenizer

    from headkv_vllm.tools.eval.runs import portable
    from headkv_vllm.tools.common.haystack import haystack_text
    from headkv_vllm.tools.common.machine import machine_info
    from headkv_vllm.tools.common.serve_process import ServerConfig, VllmServer, stop_servers_on_sigterm
    from headkv_vllm.tools.stress.watch import Sampler, drift

    stop_servers_on_sigterm()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = haystack_text()
    ids = AutoTokenizer.from_pretrained(args.model)(text)["input_ids"]
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    kv_bytes = pool_bytes(model, args.max_model_len, args.pool_fits)
    # vLLM logs each abort ("Aborted request(s) ..."): the check that disconnects reach the engine.
    config = ServerConfig(model=args.model, headkv=method.headkv, max_model_len=args.max_model_len,
                          kv_cache_memory_bytes=kv_bytes, extra_args=("--enable-log-requests", "--max-log-len", "16"))
    result = {"format": FORMAT, "command": command, "machine": machine_info(), "model": Path(args.model).name,
              "settings": {k: v for k, v in vars(args).items() if k != "mix_weights"} | {"headkv": portable(method.headkv)},
              "kv_cache_bytes": kv_bytes}
    server = VllmServer(config, out / "logs" / f"{args.name}.log")
    with server:
        result["server"] = {"command": "vllm serve " + " ".join(server.command[2:]).replace(str(server.port), "PORT"),
                            "headkv_pool": server.headkv_pool()}
        with Sampler(server, args.sample_s) as sampler:
            jobs_args = {"model": args.model, "haystack_ids": ids, "haystack_text": text,
                         "max_model_len": args.max_model_len, "vocab_size": vocab, "window": window,
                         "mix": args.mix_weights, "max_output": args.max_output,
                         "kv_sizes": method.headkv is not None}
            started = time.monotonic()
            outcomes, checkpoints = asyncio.run(drive(server, sampler, args, jobs_args))
            duration = time.monotonic() - started
        result["server_alive_at_end"] = server.proc.poll() is None
        log = server.log_text()
    result["samples"], result["failed_polls"] = sampler.samples, sampler.failed_polls
    result["sampler_errors"] = sampler.poll_errors[:20]
    result["checkpoints"] = checkpoints
    result["summary"] = summarize(outcomes, checkpoints, log, duration)
    result["drift"] = drift(checkpoints, 60 * args.warmup_minutes)
    result["verdict"] = verdict(result)
    result["outcomes"] = outcomes
    return result


async def drive(server, sampler, args: argparse.Namespace, jobs_args: dict) -> tuple[list[dict], list[dict]]:
    """Rounds of jobs until ``--requests`` or ``--minutes``; a checkpoint after each."""
    import httpx
    from tqdm import tqdm

    from headkv_vllm.tools.stress.client import run_job
    from headkv_vllm.tools.stress.workload import make_jobs

    deadline = time.monotonic() + 60 * args.minutes
    outcomes: list[dict] = []
    checkpoints = [await idle_checkpoint(server, sampler, 0, 0)]
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    gate = asyncio.Semaphore(args.concurrency)
    bar = tqdm(total=args.requests, desc="stress", unit="req")

    async def guarded(client, job):
        async with gate:
            if time.monotonic() > deadline:
                return None  # the time is up: not sent
            done = await run_job(client, server.base_url, job)
            bar.update()
            return done

    async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:
        round_no = 0
        while len(outcomes) < args.requests and time.monotonic() < deadline:
            n = min(args.round_size, args.requests - len(outcomes))
            jobs = make_jobs(n, args.seed * 1_000_003 + round_no, first_index=len(outcomes), **jobs_args)
            outcomes += [o for o in await asyncio.gather(*(guarded(client, j) for j in jobs)) if o is not None]
            round_no += 1
            checkpoints.append(await idle_checkpoint(server, sampler, len(outcomes), round_no))
            bar.set_postfix(pages_at_idle=checkpoints[-1]["pages_in_use"],
                            rss_mib=f"{checkpoints[-1]['rss_mib']['total']:.0f}")
    bar.close()
    return outcomes, checkpoints


async def idle_checkpoint(server, sampler, requests_done: int, round_no: int, timeout_s: float = 600) -> dict:
    """Wait until the server has nothing running or waiting, then read its gauges and RSS.

    vLLM publishes its gauges at engine steps, and an aborted request is freed outside
    one: a one-token probe request makes a step, so the gauges read after its answer
    are current. A probe or a /metrics read that fails is retried until the timeout,
    and the checkpoint then records the last error (it is not idle)."""
    import httpx

    from headkv_vllm.tools.stress.watch import gauges, server_rss_mib

    end = time.monotonic() + timeout_s
    probes, attempts, g, status, error = 0, 0, {}, None, None
    async with httpx.AsyncClient(timeout=120) as client:
        while time.monotonic() < end and server.proc.poll() is None:
            try:
                r = await client.post(f"{server.base_url}/v1/completions", json={
                    "model": server.config.model, "prompt": "Checkpoint.", "max_tokens": 1,
                    "request_id": f"stress-probe-{round_no}-{attempts}"})
                attempts += 1
                status = r.status_code
                probes += status == 200  # answered probes: each one request the engine finished
                g, error = await asyncio.to_thread(gauges, server), None
                if status == 200 and g["running"] == 0 and g["waiting"] == 0:
                    break
            except Exception as e:  # noqa: BLE001 - recorded in the checkpoint, which then is not idle
                error = f"{type(e).__name__}: {e}"[:300]
            await asyncio.sleep(1.0)
    idle = error is None and status == 200 and bool(g) and g["running"] == 0 and g["waiting"] == 0
    return {"t": round(time.monotonic() - sampler.t0, 2), "round": round_no, "requests_done": requests_done,
            "idle": idle, "probes": probes, "probe_status": status, "error": error, **g,
            "rss_mib": server_rss_mib(server.proc.pid)}


def engine_request_ids(log: str, pattern: str) -> set[str]:
    """``stress-N`` of the requests named by the server log's lines matching ``pattern``
    (one group: the request ids, comma-separated). vLLM's ids are ``cmpl-<ours>-0-<hex>``
    and ``chatcmpl-<ours>-<hex>``, ours being ``stress-N-<kind>``."""
    return {m for ids in re.findall(pattern, log) for m in re.findall(r"\b(stress-\d+)-[a-z]", ids)}


PREFILL_LINE = r"HeadKV request (\S+): prompt"
ABORT_LINE = r"Aborted request\(s\) (\S+)\."


def summarize(outcomes: list[dict], checkpoints: list[dict], log: str, duration_s: float) -> dict:
    prefilled = engine_request_ids(log, PREFILL_LINE)
    aborted = engine_request_ids(log, ABORT_LINE)
    by_kind: dict[str, Counter] = {}
    for o in outcomes:
        by_kind.setdefault(o["kind"], Counter())[o["outcome"]] += 1
    cancelled = [o for o in outcomes if o["outcome"] == "cancelled"]
    early = [o for o in cancelled if o["tokens"] == 0]
    statuses = Counter(str(o["status"]) for o in outcomes)
    # Requests the engine finished (vLLM's success counter; aborts are not counted), less
    # the probes: the completed ones, and cancelled ones whose last token came before the
    # disconnect did. Every cancelled request must be aborted or finished.
    finished = ((checkpoints[-1].get("successes") or 0) - (checkpoints[0].get("successes") or 0)
                - sum(c["probes"] for c in checkpoints[1:]))
    not_aborted = sum(1 for o in cancelled if f"stress-{o['index']}" not in aborted)
    kv_sizes = Counter(str(o["kv_size"] if o["kv_size"] is not None else "server") for o in outcomes
                       if o["outcome"] == "completed")
    return {
        "requests": len(outcomes), "duration_s": duration_s, "requests_per_s": len(outcomes) / duration_s,
        "outcomes": dict(Counter(o["outcome"] for o in outcomes)),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "status_codes": dict(sorted(statuses.items())),
        "http_5xx": sum(1 for o in outcomes if o["status"] and o["status"] >= 500),
        "cancelled_before_first_token": len(early),
        # of those, the ones the engine had prefilled (its log names each compressed prefill)
        "cancelled_after_prefill_began": sum(1 for o in early if f"stress-{o['index']}" in prefilled),
        "cancelled_mid_decode": len(cancelled) - len(early),
        "cancelled_aborted_by_engine": len(cancelled) - not_aborted,
        "cancelled_not_aborted": not_aborted,
        "engine_finished": finished,
        "completed_by_kv_size": dict(sorted(kv_sizes.items())),
        "malformed": _malformed_table(outcomes),
        "output_tokens": sum(o["tokens"] for o in outcomes if o["outcome"] == "completed"),
        "preemptions": max((c.get("preemptions") or 0 for c in checkpoints), default=0)
                       - (checkpoints[0].get("preemptions") or 0 if checkpoints else 0),
        "failures": [o for o in outcomes if o["outcome"] == "failed"][:20],
        "probe_errors": sum(1 for c in checkpoints if c["probe_status"] != 200),
        "server_log_error_lines": [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line][:20],
    }


def _malformed_table(outcomes: list[dict]) -> dict:
    table: dict[str, Counter] = {}
    for o in outcomes:
        if o["kind"] == "malformed":
            table.setdefault(o.get("malformed") or "?", Counter())[str(o["status"])] += 1
    return {k: dict(v) for k, v in sorted(table.items())}


def verdict(result: dict) -> dict:
    s, d = result["summary"], result["drift"]
    problems = []
    failed = s["outcomes"].get("failed", 0)
    if failed:
        problems.append(f"{failed} requests failed (first: {s['failures'][0]['detail']})")
    if s["http_5xx"]:
        problems.append(f"{s['http_5xx']} answers were 5xx")
    completed, cancelled = s["outcomes"].get("completed", 0), s["outcomes"].get("cancelled", 0)
    if not s["cancelled_not_aborted"] <= s["engine_finished"] - completed <= cancelled:
        problems.append(f"the engine finished {s['engine_finished']} requests for {completed} completed and "
                        f"{cancelled} cancelled ({s['cancelled_not_aborted']} of them not aborted): some "
                        f"cancelled requests were neither aborted nor finished, or requests finished twice")
    if s["server_log_error_lines"]:
        problems.append(f"the server logged errors, first: {s['server_log_error_lines'][0][:200]}")
    for c in result["checkpoints"]:
        pages = c.get("pages_in_use") if result["settings"]["headkv"] else 0  # stock: no head pages
        if not c["idle"] or pages != 0 or c.get("kv_usage") != 0:
            problems.append(f"checkpoint after round {c['round']}: idle={c['idle']} running={c.get('running')} "
                            f"waiting={c.get('waiting')} head pages in use={c.get('pages_in_use')} "
                            f"probe HTTP {c['probe_status']}" + (f", error {c['error']}" if c["error"] else ""))
    if not result["server_alive_at_end"]:
        problems.append("the server process was gone at the end")
    notes = []
    if not s["preemptions"]:
        notes.append("no preemption happened: lower --pool-fits or raise --concurrency to exercise it")
    drift_pct = d.get("rss_total_drift_pct")
    return {"passed": not problems, "problems": problems, "notes": notes,
            "rss_drift_target_pct": RSS_DRIFT_TARGET_PCT,
            "rss_drift_target_met": None if drift_pct is None else abs(drift_pct) < RSS_DRIFT_TARGET_PCT}


def stress_table(result: dict) -> str:
    from headkv_vllm.tools.stress.watch import PROCESSES

    s, d, v = result["summary"], result["drift"], result["verdict"]
    o = s["outcomes"]
    pct = lambda x: "-" if x is None else f"{x:+.2f}%"
    mib = lambda k: "-" if k not in d else f"{d[k]:.0f}"
    num = lambda v: "-" if v is None else f"{v:.0f}"
    last = result["checkpoints"][-1]
    lines = [
        f"{s['requests']} requests in {s['duration_s'] / 60:.1f} min ({s['requests_per_s']:.2f}/s), "
        f"{result['settings']['concurrency']} in flight, pool {result['kv_cache_bytes'] / 2**20:.0f} MiB; "
        f"verdict: {'passed' if v['passed'] else 'FAILED: ' + '; '.join(v['problems'][:3])}", "",
        "| completed | cancelled: before 1st token (prefill began) / mid-decode | rejected (4xx) | failed | 5xx | "
        "preemptions | head pages in use at idle (max over checkpoints) | running / waiting at end |",
        "|---|---|---|---|---|---|---|---|",
        f"| {o.get('completed', 0)} | {s['cancelled_before_first_token']} ({s['cancelled_after_prefill_began']}) / "
        f"{s['cancelled_mid_decode']} | {o.get('rejected', 0)} | {o.get('failed', 0)} | {s['http_5xx']} | "
        f"{s['preemptions']:.0f} | {num(d['pages_in_use_at_idle_max'])} | {num(last.get('running'))} / "
        f"{num(last.get('waiting'))} |",
        "", f"Server RSS at idle checkpoints after {d['warmup_s'] / 60:.0f} min of warm-up "
            f"({d['checkpoints_after_warmup']} checkpoints, target drift under {RSS_DRIFT_TARGET_PCT:.0f}%):", "",
        "| process | first (MiB) | last (MiB) | drift | slope (MiB/h) |", "|---|---|---|---|---|",
    ]
    for proc in PROCESSES:
        slope = d.get(f"rss_{proc}_slope_mib_per_hour")
        lines.append(f"| {proc} | {mib(f'rss_{proc}_first_mib')} | {mib(f'rss_{proc}_last_mib')} | "
                     f"{pct(d.get(f'rss_{proc}_drift_pct'))} | {'-' if slope is None else f'{slope:+.1f}'} |")
    lines += ["", "| malformed request | answers (HTTP status: count) |", "|---|---|"]
    lines += [f"| {what} | {', '.join(f'{k}: {n}' for k, n in codes.items())} |" for what, codes in s["malformed"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
