"""What ``headkv-vllm stress`` watches on the server: the resident memory (RSS) of its
processes, sampled with its gauges in a thread, and the drift of both over a run."""

from __future__ import annotations

import re
import time

import psutil

from headkv_vllm.tools.common.serve_process import Poller

GAUGES = {
    "running": "vllm:num_requests_running",
    "waiting": "vllm:num_requests_waiting",
    "kv_usage": "vllm:kv_cache_usage_perc",
    "pages_in_use": "vllm:headkv_head_pages_in_use",
    "pages_free": "vllm:headkv_head_pages_free",
}
MIB = 2**20
PROCESSES = ("total", "worker", "engine_core", "api_server")


def server_rss_mib(pid: int) -> dict[str, float]:
    """RSS of the ``vllm serve`` process (the API server) and of its children (the
    engine core; the worker, which holds the model and the KV pool; others), in MiB;
    gone processes count 0."""
    out = {"api_server": 0.0, "engine_core": 0.0, "worker": 0.0, "other": 0.0}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            rss = p.memory_info().rss / MIB
            title = " ".join(p.cmdline()) + " " + p.name()  # vLLM sets VLLM::EngineCore / VLLM::Worker
            name = ("api_server" if p.pid == pid else "engine_core" if "EngineCore" in title
                    else "worker" if "Worker" in title else "other")
        except psutil.NoSuchProcess:
            continue
        out[name] += rss
    out["total"] = sum(out.values())
    return out


def gauges(server, timeout_s: float = 30) -> dict[str, float | None]:
    from headkv_vllm.tools.common.serve_process import parse_prometheus

    text = server.metrics_text(timeout_s)
    values = parse_prometheus(text)
    return {k: values.get(name) for k, name in GAUGES.items()} | {
        "preemptions": values.get("vllm:num_preemptions_total"), "successes": finished_requests(text)}


def finished_requests(metrics_text: str) -> float | None:
    """vLLM's ``request_success_total`` for the finish reasons of a full answer (stop,
    length), summed over engines; None when the server publishes none."""
    found = re.findall(r'^vllm:request_success_total\{[^}]*finished_reason="(?:stop|length)"[^}]*\} (\S+)$',
                       metrics_text, flags=re.M)
    return sum(map(float, found)) if found else None


class Sampler(Poller):
    """Every ``interval_s``: RSS always, the gauges when /metrics answers (a busy CPU
    server can take seconds; a failed poll leaves them ``None`` and is counted)."""

    def __init__(self, server, interval_s: float = 2.0):
        super().__init__(interval_s)
        self.server = server
        self.t0 = time.monotonic()
        self.samples: list[dict] = []
        self.failed_polls = 0

    def poll(self) -> None:
        sample = {"t": round(time.monotonic() - self.t0, 2), "rss_mib": server_rss_mib(self.server.proc.pid)}
        try:
            sample |= gauges(self.server)
        except Exception:  # noqa: BLE001 - a sampler must outlive a bad poll
            self.failed_polls += 1
        self.samples.append(sample)


def drift(checkpoints: list[dict], warmup_s: float) -> dict:
    """RSS and head-page drift over the idle checkpoints after ``warmup_s``: first to last
    (percent of the first) and the least-squares slope (MiB per hour)."""
    after = [c for c in checkpoints if c["t"] >= warmup_s]
    out: dict = {"warmup_s": warmup_s, "checkpoints_after_warmup": len(after),
                 # None where the server publishes no head pages (stock vLLM)
                 "pages_in_use_at_idle_max": max((c["pages_in_use"] for c in checkpoints
                                                  if c.get("pages_in_use") is not None), default=None)}
    if len(after) < 2:
        out["note"] = "fewer than two idle checkpoints after the warm-up: no drift"
        return out
    for proc in PROCESSES:
        first, last = after[0]["rss_mib"][proc], after[-1]["rss_mib"][proc]
        out[f"rss_{proc}_first_mib"], out[f"rss_{proc}_last_mib"] = first, last
        out[f"rss_{proc}_drift_pct"] = 100.0 * (last - first) / first if first else None
        out[f"rss_{proc}_slope_mib_per_hour"] = _slope([c["t"] / 3600 for c in after], [c["rss_mib"][proc] for c in after])
    out["span_s"] = after[-1]["t"] - after[0]["t"]
    return out


def _slope(x: list[float], y: list[float]) -> float | None:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    var = sum((a - mx) ** 2 for a in x)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / var if var else None
