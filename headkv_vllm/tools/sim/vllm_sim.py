"""vLLM's real scheduler without a model, for ``headkv-vllm sched-sim``.

The scheduler-side cost of head pages (a block pool hundreds of times larger than
stock, one KV-cache group per layer) is measured on vLLM's own ``Scheduler`` /
``KVCacheManager`` / ``BlockPool``, built the way ``EngineCore`` builds them
(``get_kv_cache_configs`` from per-layer specs and a byte budget, then ``Scheduler``),
and stepped with fake model outputs, as vLLM's own scheduler tests do.

Target: vLLM 0.32.x; update when these signatures change. The engine never loads this
module (``tests/test_package_structure.py`` allows it to import vLLM for that reason).
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.engine.arg_utils import EngineArgs
from vllm.platforms import current_platform
from vllm.sampling_params import SamplingParams
from vllm.utils.gc_utils import freeze_gc_heap
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.utils.import_utils import resolve_obj_by_qualname
from vllm.v1.attention.backend import AttentionBackend
from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts, resolve_kv_cache_layout
from vllm.v1.core.kv_cache_utils import (
    generate_scheduler_kv_cache_config,
    get_kv_cache_configs,
    get_request_block_hasher,
    init_none_hash,
    resolve_kv_cache_block_sizes,
)
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

__all__ = [
    "engine_config", "full_attention_specs", "dense_backend_cls", "backend_cls", "scheduler_kv_cache_config",
    "build_scheduler", "request_block_hasher", "make_request", "model_runner_output", "freeze_gc_heap",
    "num_free_blocks", "finish_all_requests",
]


def engine_config(**engine_args) -> VllmConfig:
    """``EngineArgs(**engine_args).create_engine_config()`` (platform and plugin hooks run)."""
    return EngineArgs(**engine_args).create_engine_config()


def full_attention_specs(num_layers: int, num_kv_heads: int, head_size: int, block_size: int = 16,
                         dtype: torch.dtype = torch.bfloat16) -> dict[str, FullAttentionSpec]:
    """Stock per-layer specs of a decoder, by layer name, as a model runner reports them."""
    return {f"model.layers.{i}.self_attn.attn": FullAttentionSpec(
        block_size=block_size, num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype)
        for i in range(num_layers)}


def dense_backend_cls() -> type[AttentionBackend]:
    """The stock dense attention backend of this platform (the no-compression path)."""
    if current_platform.is_cpu():
        return resolve_obj_by_qualname("vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend")
    return resolve_obj_by_qualname("vllm.v1.attention.backends.triton_attn.TritonAttentionBackend")


def backend_cls(class_path: str) -> type[AttentionBackend]:
    return resolve_obj_by_qualname(class_path)


def scheduler_kv_cache_config(vllm_config: VllmConfig, layer_specs: dict, kv_cache_bytes: int,
                              backend: type[AttentionBackend]):
    """The scheduler's ``KVCacheConfig`` for one worker with ``kv_cache_bytes`` of KV cache,
    as ``EngineCore._initialize_kv_caches`` makes it (the KV-cache layout resolved from
    ``backend``'s supported layouts); sets ``cache_config.num_gpu_blocks``."""
    layouts = [layout.name for layout in get_supported_kv_cache_layouts([backend])]
    resolve_kv_cache_layout(vllm_config, [layouts], list(layer_specs.values()))
    configs = get_kv_cache_configs(vllm_config, [layer_specs], [kv_cache_bytes])
    config = generate_scheduler_kv_cache_config(configs)
    vllm_config.cache_config.num_gpu_blocks = config.num_blocks
    return config


def build_scheduler(vllm_config: VllmConfig, kv_cache_config) -> Scheduler:
    """vLLM's V1 ``Scheduler`` (with its ``KVCacheManager`` and ``BlockPool``), as ``EngineCore`` builds it."""
    block_size, hash_block_size = resolve_kv_cache_block_sizes(kv_cache_config, vllm_config)
    return Scheduler(
        vllm_config=vllm_config, kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size, hash_block_size=hash_block_size, log_stats=False,
    )


def request_block_hasher(vllm_config: VllmConfig, scheduler: Scheduler):
    """The prefix-caching block hasher ``EngineCore`` gives requests, or None when caching is off."""
    if not vllm_config.cache_config.enable_prefix_caching:
        return None
    hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    return get_request_block_hasher(scheduler.hash_block_size, hash_fn)


def make_request(request_id: str, prompt_token_ids: list[int], max_tokens: int, block_hasher=None) -> Request:
    """An engine-core ``Request``: greedy, EOS ignored, exactly ``max_tokens`` generated."""
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    return Request(request_id=request_id, prompt_token_ids=prompt_token_ids, sampling_params=params,
                   pooling_params=None, block_hasher=block_hasher)


def model_runner_output(req_ids: list[str], sampled_token_ids: list[list[int]]) -> ModelRunnerOutput:
    """What a model runner returns for one step: one list of sampled tokens per request."""
    return ModelRunnerOutput(req_ids=list(req_ids), req_id_to_index={r: i for i, r in enumerate(req_ids)},
                             sampled_token_ids=sampled_token_ids)


def num_free_blocks(scheduler: Scheduler) -> int:
    return scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def finish_all_requests(scheduler: Scheduler) -> None:
    """Abort every request (as a client disconnect does); their blocks go back to the pool."""
    scheduler.finish_requests(None, RequestStatus.FINISHED_ABORTED)
