"""HeadKV's stat logger (``engine.metrics``) on a real engine config (``EngineArgs``, no
engine started): what it records on vLLM's Prometheus registry for given scheduler and
iteration stats (vLLM's own stats classes).

The series are shared by every logger of the process, so each test reads the change it
makes under its own ``engine`` label.
"""

import itertools

import pytest
from prometheus_client import REGISTRY
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.engine import FinishReason
from vllm.v1.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats

from headkv_vllm.engine.metrics import HeadKVStatLogger, note_request_kv_size
from headkv_vllm.method.budgets import FULL

KV_SIZE_SERVED, WINDOW = 64, 8  # SnapKV: every KV head keeps min(prompt, 64) tokens, window included
NUM_BLOCKS = 1001  # the pool's head pages, vLLM's null page included
_engines = itertools.count(100)  # a fresh engine label per logger


@pytest.fixture(scope="module")
def configs(model_dir):
    def make(**extra):
        config = EngineArgs(model=str(model_dir), dtype="float32", max_model_len=2048, **extra).create_engine_config()
        config.cache_config.num_gpu_blocks = NUM_BLOCKS  # set by the engine core once the KV cache is sized
        return config

    headkv = make(attention_backend="headkv",
                  additional_config={"headkv": {"policy": "snapkv", "kv_size": KV_SIZE_SERVED, "window": WINDOW}})
    return {"headkv": headkv, "stock": make()}


def new_logger(config) -> tuple[HeadKVStatLogger, dict]:
    engine = next(_engines)
    return HeadKVStatLogger(config, engine), {"model_name": config.model_config.served_model_name,
                                              "engine": str(engine)}


def value(name: str, labels: dict, **more) -> float:
    return REGISTRY.get_sample_value(name, {**labels, **more}) or 0.0


def finished(request_id: str, prompt: int, generated: int) -> FinishedRequestStats:
    return FinishedRequestStats(finish_reason=FinishReason.LENGTH, request_id=request_id,
                                num_prompt_tokens=prompt, num_generation_tokens=generated)


def iteration(*done: FinishedRequestStats) -> IterationStats:
    stats = IterationStats()
    stats.finished_requests = list(done)
    return stats


def test_pool_pages_from_the_schedulers_kv_cache_usage(configs):
    logger, labels = new_logger(configs["headkv"])
    assert logger.pool_pages() == NUM_BLOCKS - 1
    logger.record(SchedulerStats(kv_cache_usage=0.25), None)
    assert value("vllm:headkv_head_pages_in_use", labels) == 250
    assert value("vllm:headkv_head_pages_free", labels) == 750
    logger.record(SchedulerStats(kv_cache_usage=0.0), None)
    assert value("vllm:headkv_head_pages_in_use", labels) == 0
    assert value("vllm:headkv_head_pages_free", labels) == 1000


def test_finished_requests_count_their_prompt_and_kept_tokens(configs):
    logger, labels = new_logger(configs["headkv"])
    note_request_kv_size("short", None)
    note_request_kv_size("long", None)
    logger.record(None, iteration(finished("long", 1000, 5), finished("short", 40, 3)))
    # each head keeps min(prompt, kv_size) tokens: 64 of 1000 (compressed), all 40 of 40 (not)
    assert value("vllm:headkv_prompt_tokens_total", labels) == 1040
    assert value("vllm:headkv_kept_tokens_total", labels) == 64 + 40
    assert value("vllm:headkv_requests_total", labels, compressed="true") == 1
    assert value("vllm:headkv_requests_total", labels, compressed="false") == 1
    assert value("vllm:headkv_kept_share_count", labels) == 2
    assert value("vllm:headkv_kept_share_sum", labels) == pytest.approx(64 / 1000 + 1.0)
    # 0.064 falls in the 0.1 bucket, 1.0 in the last
    assert value("vllm:headkv_kept_share_bucket", labels, le="0.05") == 0
    assert value("vllm:headkv_kept_share_bucket", labels, le="0.1") == 1
    assert value("vllm:headkv_kept_share_bucket", labels, le="1.0") == 2


@pytest.mark.parametrize("own, kept", [(32, 32), (128, 128), (FULL, 1000)])
def test_a_request_is_counted_at_the_kv_size_it_asked_for(configs, own, kept):
    logger, labels = new_logger(configs["headkv"])
    note_request_kv_size("own", own)  # as vllm_patches patch 7 notes it on arrival
    logger.record(None, iteration(finished("own", 1000, 2)))
    assert value("vllm:headkv_kept_tokens_total", labels) == kept
    assert value("vllm:headkv_requests_total", labels, compressed="true" if kept < 1000 else "false") == 1
    # the size stays noted (n > 1 requests finish several children under one id) until
    # the id arrives again without one
    note_request_kv_size("own", None)
    logger.record(None, iteration(finished("own", 1000, 2)))
    assert value("vllm:headkv_kept_tokens_total", labels) == kept + KV_SIZE_SERVED


def test_requests_never_prefilled_are_left_out(configs):
    logger, labels = new_logger(configs["headkv"])
    logger.record(None, iteration(finished("aborted-waiting", 500, 0), finished("empty", 0, 0)))
    assert value("vllm:headkv_prompt_tokens_total", labels) == 0
    assert value("vllm:headkv_kept_share_count", labels) == 0


def test_a_server_without_headkv_records_nothing(configs):
    logger, labels = new_logger(configs["stock"])
    assert logger.rule is None
    logger.record(SchedulerStats(kv_cache_usage=0.5), iteration(finished("x", 1000, 5)))
    assert REGISTRY.get_sample_value("vllm:headkv_prompt_tokens_total", labels) is None
    assert REGISTRY.get_sample_value("vllm:headkv_head_pages_in_use", labels) is None
