"""HeadKV's metrics on vLLM's Prometheus ``/metrics``: a vLLM stat-logger plugin
(entry point group ``vllm.stat_logger_plugins``), run in the API server process with
vLLM's own loggers, named and labelled as vLLM's (``vllm:`` prefix, ``model_name`` and
``engine`` labels, gauges in multiprocess mode ``mostrecent``).

- ``vllm:headkv_head_pages_in_use`` / ``vllm:headkv_head_pages_free``: the page pool
  (vLLM's KV-cache usage times the pool's head pages).
- ``vllm:headkv_prompt_tokens_total`` / ``vllm:headkv_kept_tokens_total``: prompt tokens
  of the finished requests that were prefilled, and the tokens their KV heads kept on
  average (over layers and heads, window included).
- ``vllm:headkv_kept_share``: histogram of each such request's kept / prompt tokens.
- ``vllm:headkv_requests_total{compressed="true"|"false"}``: finished requests whose
  heads kept fewer tokens than the prompt (or did not).

Kept tokens follow from a request's prompt length and its KV size (the server's, or
its ``vllm_xargs`` ``headkv_kv_size``, noted as the request arrives), as the worker
computes them (``Budgets.kept``).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from headkv_vllm.engine.settings import headkv_from_vllm_config
from headkv_vllm.engine.vllm_access import BACKEND_NAME, StatLoggerBase, selected_backend_name
from headkv_vllm.method.bounded import BoundedCache

KEPT_SHARE_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 0.9, 1.0)
MAX_NOTED = 65536  # requests' own KV sizes remembered (least recently noted dropped beyond)

# External request id -> its own KV size, noted as the request arrives (engine.vllm_patches
# patch 7). Read, not removed, when the request finishes: the children of an n > 1
# request share their parent's id, and an aborted request reports no finish.
_request_kv_sizes: BoundedCache[str, int | str] = BoundedCache(MAX_NOTED)
_series: dict | None = None  # one set per process, shared by the loggers of every engine


def note_request_kv_size(request_id: str, kv_size) -> None:
    _request_kv_sizes.pop(request_id)
    if kv_size is not None:
        _request_kv_sizes.put(request_id, kv_size)


def _made() -> dict:
    """The series, made at the first record: vLLM's Prometheus logger, built after the
    plugins' loggers, unregisters every 'vllm:' collector when it starts."""
    global _series
    if _series is None:
        names = ["model_name", "engine"]
        gauge = lambda name, doc: Gauge(name, doc, labelnames=names, multiprocess_mode="mostrecent")
        _series = {
            "in_use": gauge("vllm:headkv_head_pages_in_use", "HeadKV head pages held by requests."),
            "free": gauge("vllm:headkv_head_pages_free", "HeadKV head pages free in the pool."),
            "prompt": Counter("vllm:headkv_prompt_tokens", "Prompt tokens of finished, prefilled requests.",
                              labelnames=names),
            "kept": Counter("vllm:headkv_kept_tokens", "Tokens each KV head kept of those prompts, on average "
                            "over layers and heads (window included).", labelnames=names),
            "share": Histogram("vllm:headkv_kept_share", "Kept / prompt tokens per finished, prefilled request.",
                               labelnames=names, buckets=KEPT_SHARE_BUCKETS),
            "requests": Counter("vllm:headkv_requests", "Finished, prefilled requests, compressed or not.",
                                labelnames=names + ["compressed"]),
        }
    return _series


class HeadKVStatLogger(StatLoggerBase):
    """One per engine (vLLM's per-engine adapter); all of a process share the series."""

    def __init__(self, vllm_config, engine_index: int = 0):
        self.vllm_config = vllm_config
        self.labels = [vllm_config.model_config.served_model_name, str(engine_index)]
        self.rule = None
        if selected_backend_name(vllm_config) == BACKEND_NAME:
            _, self.rule, _ = headkv_from_vllm_config(vllm_config)

    def pool_pages(self) -> int:
        """One engine's head pages without vLLM's null page (the front end's block count
        sums the data-parallel engines)."""
        engines = max(1, self.vllm_config.parallel_config.data_parallel_size)
        return (self.vllm_config.cache_config.num_gpu_blocks or 0) // engines - 1

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if self.rule is None:
            return
        m = _made()
        total = self.pool_pages()
        if scheduler_stats is not None and total > 0:
            in_use = round(scheduler_stats.kv_cache_usage * total)  # vLLM's usage leaves the null page out
            m["in_use"].labels(*self.labels).set(in_use)
            m["free"].labels(*self.labels).set(total - in_use)
        for done in getattr(iteration_stats, "finished_requests", None) or ():
            n = done.num_prompt_tokens
            if not n or not done.num_generation_tokens:  # never prefilled (aborted while waiting)
                continue
            kept = self.rule.budgets(_request_kv_sizes.peek(done.request_id)).kept(n)
            mean = sum(map(sum, kept)) / (self.rule.num_layers * self.rule.num_kv_heads)
            m["prompt"].labels(*self.labels).inc(n)
            m["kept"].labels(*self.labels).inc(mean)
            m["share"].labels(*self.labels).observe(mean / n)
            m["requests"].labels(*self.labels, "true" if mean < n else "false").inc()

    def log_engine_initialized(self):
        pass
