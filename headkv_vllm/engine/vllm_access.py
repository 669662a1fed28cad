"""Access to vLLM internals: the vLLM types the plugin uses, accessors of the model
runner and its input batch, and vLLM's CPU and flash attention ops.

Target: vLLM 0.32.x (V1 engine). With ``engine.vllm_patches`` (what the plugin changes
in vLLM) this is where a vLLM upgrade starts: every other engine module imports vLLM
only through these two (``tests/test_package_structure.py`` checks it). They cannot
hold everything, though: the plugin also subclasses vLLM classes and relies on how vLLM
calls them. Those places, outside these modules, and why:

- ``engine.kv_spec.HeadKVSpec`` (a ``FullAttentionSpec``) overrides
  ``max_num_blocks_per_req``, ``max_memory_usage_bytes``, ``merge``,
  ``is_uniform_with_collection`` and ``prefix_cacheable``: a block is one head page,
  each layer its own KV-cache group. vLLM probes ``merge`` by catching
  ``AssertionError``.
- ``engine.kv_spec.HeadKVManager`` (a ``SingleTypeKVCacheManager``) overrides
  ``get_num_blocks_to_allocate`` (reads its ``apply_admission_cap`` keyword),
  ``allocate_new_blocks``, ``remove_skipped_blocks`` (relies on ``allocate_slots``
  calling it, with the prompt length, before every real allocation),
  ``pop_blocks_for_free`` and ``find_longest_cache_hit``; calls the private
  ``_remove_blocks_in_range`` and reads ``req_to_blocks`` and ``block_pool``: it counts
  head pages from the lengths alone and frees a chunked prompt's uncompressed pages the
  way vLLM frees a sliding window's.
- ``engine.backend.HeadKVMetadataBuilder._cudagraph_support`` (vLLM's private class
  attribute, read through ``get_cudagraph_support``): NEVER, the step plan is built on
  the host from each step's lengths.
- ``engine.worker.HeadKVWorker`` subclasses the platform's worker (set as
  ``parallel_config.worker_cls`` by ``engine.settings``) and overrides ``init_device``,
  ``determine_available_memory`` and ``initialize_from_config``: head-page specs, the
  block tables' memory, one step planner for all layers.
- ``engine.step_planner.StepPlanner.plan`` recognises a step by the identity of
  ``CommonAttentionMetadata.query_start_loc_cpu``: vLLM 0.32's runner slices a fresh
  view of its buffer per ``_build_attention_metadata`` call and shallow-copies the
  metadata per KV-cache group, so one plan serves every layer of a step.
- ``engine.cpu_page_store`` hands head pages to vLLM's CPU ops as stock CPU blocks of
  one KV head; caches written by the cache-write op (ISA-specific K packing) are read
  only by its attention op.
- ``engine.metrics.HeadKVStatLogger`` (a ``StatLoggerBase``) reads
  ``SchedulerStats.kv_cache_usage`` and ``IterationStats.finished_requests``, and makes
  its series at the first record because vLLM's Prometheus logger unregisters every
  ``vllm:`` collector when it starts.
- ``engine.settings.apply_engine_settings`` rewrites engine options
  (``enable_prefix_caching``, ``block_size``, ``worker_cls``) inside the platform's
  config check (``vllm_patches`` patch 3), after vLLM validated them.
- ``tools.sim.vllm_sim`` builds vLLM's scheduler without a model, as ``EngineCore``
  does (``headkv-vllm sched-sim``; the engine never loads it).
"""

from __future__ import annotations

import torch
from vllm import _custom_ops as _ops
from vllm import envs as _envs
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index
from vllm.platforms import current_platform
from vllm.utils.import_utils import resolve_obj_by_qualname
from vllm.utils.math_utils import cdiv
from vllm.utils.platform_utils import is_pin_memory_available
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, KVCacheLayout
from vllm.v1.metrics.loggers import StatLoggerBase

__all__ = [
    # vLLM's types and helpers, as the plugin uses them
    "AttentionBackend", "AttentionBackendEnum", "AttentionCGSupport", "AttentionImpl", "AttentionMetadataBuilder",
    "AttentionSpec", "AttentionType", "CommonAttentionMetadata", "FullAttentionSpec", "KVCacheLayout",
    "MultipleOf", "SingleTypeKVCacheManager", "StatLoggerBase", "VllmConfig", "cdiv", "current_platform",
    "extract_layer_index", "get_current_vllm_config",
    # the engine config
    "BACKEND_NAME", "logger", "selected_backend_name", "uses_v2_model_runner",
    "parallel_sizes", "platform_worker_cls", "pin_memory_available",
    # the model runner and its input batch
    "metadata_builders", "num_prompt_tokens", "request_ids", "live_request_ids", "request_extra_args",
    "seq_lens_cpu", "head_kv_group_layers", "kv_cache_group_sizes", "kv_cache_tensor_offsets",
    "block_table_width", "block_table_row_counts",
    # attention ops
    "cpu_attention_isa", "cpu_cache_write", "cpu_attention_schedule", "cpu_attention", "flash_prefill_attention",
]

BACKEND_NAME = "HEADKV"  # our member of vLLM's AttentionBackendEnum (vllm_patches patch 1)

# Under the "vllm" logger tree so that vLLM's logging configuration shows our lines.
logger = init_logger("vllm.headkv")


# ---------------------------------------------------------------------------
# The engine config.
# ---------------------------------------------------------------------------

def selected_backend_name(vllm_config: VllmConfig) -> str | None:
    backend = vllm_config.attention_config.backend
    return None if backend is None else backend.name


def uses_v2_model_runner(vllm_config: VllmConfig) -> bool:
    return vllm_config.use_v2_model_runner


def parallel_sizes(vllm_config: VllmConfig) -> dict[str, int]:
    """The parallelism HeadKV cannot split yet, by the option that sets it."""
    par = vllm_config.parallel_config
    return {
        "--tensor-parallel-size": par.tensor_parallel_size,
        "--pipeline-parallel-size": par.pipeline_parallel_size,
        "--decode-context-parallel-size": par.decode_context_parallel_size,
        "--prefill-context-parallel-size": par.prefill_context_parallel_size,
    }


def platform_worker_cls() -> type:
    """The worker class this platform uses by default (CPUWorker / GPU Worker)."""
    if current_platform.is_cpu():
        return resolve_obj_by_qualname("vllm.v1.worker.cpu_worker.CPUWorker")
    return resolve_obj_by_qualname("vllm.v1.worker.gpu_worker.Worker")


def pin_memory_available() -> bool:
    return is_pin_memory_available()


# ---------------------------------------------------------------------------
# The model runner (V1) and its persistent input batch.
# ---------------------------------------------------------------------------

def metadata_builders(model_runner):
    for groups in model_runner.attn_groups:
        for group in groups:
            yield from group.metadata_builders


def num_prompt_tokens(model_runner, num_reqs: int):
    """Prompt length of each request in the persistent batch, in batch order (CPU int tensor)."""
    return model_runner.input_batch.num_prompt_tokens_cpu_tensor[:num_reqs]


def request_ids(model_runner) -> list[str]:
    """Ids of the requests in the persistent batch, in batch order."""
    return model_runner.input_batch.req_ids


def live_request_ids(model_runner):
    """Ids of every request the runner holds state for (scheduled in this step or not,
    preempted included; dropped when they finish)."""
    return model_runner.requests.keys()


def request_extra_args(model_runner, ids: list[str]) -> list:
    """Each request's ``SamplingParams.extra_args`` (None where it has none)."""
    requests = model_runner.requests
    out = []
    for request_id in ids:
        params = getattr(requests.get(request_id), "sampling_params", None)
        out.append(params.extra_args if params is not None else None)
    return out


def seq_lens_cpu(cm: CommonAttentionMetadata) -> torch.Tensor:
    """Host copy of ``seq_lens``: vLLM's upper bound is exact without speculative
    decoding (off under HeadKV); the device copy is read only if it is missing."""
    if cm.seq_lens_cpu_upper_bound is not None:
        return cm.seq_lens_cpu_upper_bound
    return cm.seq_lens.cpu()


def head_kv_group_layers(model_runner) -> list[tuple[int, int]]:
    """(KV-cache group id, layer index) of every HeadKV group."""
    groups = model_runner.kv_cache_config.kv_cache_groups
    return [(i, g.kv_cache_spec.layer_index) for i, g in enumerate(groups)
            if hasattr(g.kv_cache_spec, "layer_index")]


def kv_cache_group_sizes(kv_cache_config) -> list[int]:
    return [len(g.layer_names) for g in kv_cache_config.kv_cache_groups]


def kv_cache_tensor_offsets(kv_cache_config) -> set[int]:
    return {getattr(t, "offset", 0) for t in kv_cache_config.kv_cache_tensors}


def block_table_width(max_num_blocks: int, block_size: int) -> int:
    """Width vLLM gives a group's block table (rounded up to whole 128-token spans)."""
    # Worker-side module (it loads vLLM's Triton helpers): not in the API server, which registers the plugin too.
    from vllm.v1.worker.block_table import get_block_table_width

    return get_block_table_width(max_num_blocks, block_size)


def block_table_row_counts(model_runner, group_id: int):
    return model_runner.input_batch.block_table.block_tables[group_id].num_blocks_per_row


# ---------------------------------------------------------------------------
# vLLM's CPU attention ops (``vllm._custom_ops.cpu_attn_*``), reused on the CPU by
# ``engine.cpu_page_store``: a head page has the shape of a stock CPU block with one KV
# head, and prefill attention runs on a scratch cache of stock blocks. The cache-write
# op packs K in an ISA-specific order, so caches it writes are read only by its
# attention op. The signatures follow vLLM's CPU backend (``cpu_attn.py``).
# ---------------------------------------------------------------------------

def cpu_attention_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    # The CPU backend's module, loaded on the CPU platform only.
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size, "auto")


def cpu_cache_write(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    slots: torch.Tensor, isa: str) -> None:
    """Write ``key[i]``/``value[i]`` (``[M, Hkv, d]``) at slot ``slots[i]`` (int64) of the
    caches (``[num_blocks, Hkv, block_size, d]`` views)."""
    _ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)


def cpu_attention_schedule(seq_lens: torch.Tensor, query_start_loc: torch.Tensor, num_heads: int, num_kv_heads: int,
                           head_dim: int, dtype: torch.dtype, isa: str) -> torch.Tensor:
    """The attention op's work split (int32 inputs; causal)."""
    return _ops.cpu_attn_get_scheduler_metadata(
        num_reqs=seq_lens.shape[0], num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        seq_lens=seq_lens, dtype=dtype, query_start_loc=query_start_loc, causal=True,
        sliding_window_size=-1, isa=isa, enable_kv_split=_envs.VLLM_CPU_ATTN_SPLIT_KV,
    )


def cpu_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, output: torch.Tensor,
                  query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                  schedule: torch.Tensor, scale: float) -> None:
    """Causal attention of ``query`` ``[M, Hq, d]`` (sequence s: rows ``query_start_loc[s]..[s+1]``,
    the last of its ``seq_lens[s]`` tokens) over the cache blocks ``block_tables[s]``."""
    _ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=output,
        query_start_loc=query_start_loc, seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None,
        sliding_window=-1, block_table=block_tables, softcap=0.0, scheduler_metadata=schedule, s_aux=None,
    )


# ---------------------------------------------------------------------------
# vLLM's variable-length flash attention (``v1/attention/backends/fa_utils``) for
# HeadKV's prefill attention on CUDA: one call for all prompts of a step (SDPA would
# run one call per prompt, and its fp32 path is O(n^2) in memory). The signature
# follows vLLM's FlashAttention backend.
# ---------------------------------------------------------------------------

def flash_prefill_attention(dtype: torch.dtype, head_size: int):
    """A ``core.prompt_attention.PromptAttention`` over vLLM's flash attention, or None where
    it is not available (CPU, fp32, no flash build)."""
    if not current_platform.is_cuda() or dtype not in (torch.float16, torch.bfloat16):
        return None
    # Loads the flash-attention build on CUDA: only in workers that choose this route.
    from vllm.v1.attention.backends import fa_utils

    if not fa_utils.is_flash_attn_varlen_func_available():
        return None
    version = fa_utils.get_flash_attn_version(head_size=head_size)
    extra = {} if version is None else {"fa_version": version}

    def attend(q, k, v, plan, scale):
        return fa_utils.flash_attn_varlen_func(
            q, k, v, max_seqlen_q=plan.prompts.max_len_q, cu_seqlens_q=plan.prompts.cu_seqlens_q,
            max_seqlen_k=plan.prompts.max_len_k, cu_seqlens_k=plan.prompts.cu_seqlens_k,
            softmax_scale=scale, causal=True, **extra,
        )

    return attend
