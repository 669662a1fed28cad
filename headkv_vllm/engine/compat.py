"""The one module that touches vLLM internals.

Target: vLLM 0.32.x (V1 engine). Every private name the plugin relies on is
imported or patched here, so a vLLM upgrade touches this file only.

Patches (each applied once per process, idempotently, from ``register()``):

1. ``AttentionBackendEnum.HEADKV`` -- a dynamic enum member.
   Why: ``--attention-backend headkv`` is parsed as ``AttentionBackendEnum["HEADKV"]``.
   How: ``AttentionBackendEnum.register``; the member gets a ``__reduce_ex__``
   that re-registers on unpickling, because engine-core and worker processes
   are spawned and unpickle the config before their plugins load.
   Remove when: vLLM pickles dynamic backend members by name.
2. ``CpuPlatform.get_attn_backend_cls``.
   Why: the CPU platform ignores the selected backend and always returns CPU_ATTN.
   How: wrapped; returns our backend's path when HEADKV is selected.
   Remove when: the CPU platform honours ``--attention-backend``.
3. ``Platform.check_and_update_config`` of the current platform.
   Why: HeadKV needs engine settings (validated plugin config, later: no
   prefix caching) applied once, in the first process, before the engine starts.
   How: wrapped; calls the plugin's hook after the platform's own checks.
   Remove when: vLLM offers a config hook to general plugins.
3b. ``VllmConfig._get_v2_model_runner_unsupported_features``.
   Why: Model Runner V2 is vLLM's default on CUDA; HeadKV reads the V1 runner's
   input batch (prompt lengths, request ids, block-table row counts).
   How: wrapped; lists the HEADKV backend as unsupported when it is selected, so
   vLLM itself picks V1 before the engine starts and logs why.
   Remove when: HeadKV supports V2's input buffers.
6. ``InputProcessor.process_inputs``.
   Why: per-request HeadKV settings (``vllm_xargs`` / ``SamplingParams.extra_args``
   keys ``headkv_*``) must be refused with HTTP 400 before they reach the engine;
   vLLM passes unknown extra args through unchecked.
   How: wrapped; checks the request's ``headkv_*`` keys first and raises vLLM's
   ``VLLMValidationError`` (400, the field named); notes the request's own KV size
   for the metrics (``engine.metrics``).
   Remove when: vLLM lets plugins validate extra args.
7. ``Scheduler.__init__``.
   Why: a request's own KV size sets its page count from its first allocation, and the
   KV-cache managers see only request ids.
   How: wrapped; hands the scheduler's ``requests`` dict to every HeadKV manager.
   Remove when: managers receive the request (or its sampling params).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import vllm
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum

if TYPE_CHECKING:
    from vllm.v1.kv_cache_interface import AttentionSpec

__all__ = [
    "AttentionBackend",
    "AttentionImpl",
    "AttentionMetadataBuilder",
    "AttentionType",
    "CommonAttentionMetadata",
    "VllmConfig",
    "get_current_vllm_config",
    "init_logger",
    "current_platform",
    "SUPPORTED_VLLM",
    "vllm_version",
    "register_backend_member",
    "route_cpu_platform_to",
    "wrap_check_and_update_config",
    "dense_backend_cls",
    "selected_backend_name",
    "keep_headkv_on_v1_runner",
    "uses_v2_model_runner",
    "parallel_sizes",
]

SUPPORTED_VLLM = "0.32."
BACKEND_NAME = "HEADKV"

# Under the "vllm" logger tree so that vLLM's logging configuration shows our lines.
logger = init_logger("vllm.headkv")


def vllm_version() -> str:
    return vllm.__version__


def _unpickle_member(name: str) -> AttentionBackendEnum:
    # Runs in a spawned process that may not have loaded plugins yet.
    from headkv_vllm.engine.plugin import register

    register()
    return AttentionBackendEnum[name]


def register_backend_member(class_path: str) -> None:
    """Create ``AttentionBackendEnum.HEADKV`` -> ``class_path`` (idempotent)."""
    if BACKEND_NAME in AttentionBackendEnum.__members__:
        return
    member = AttentionBackendEnum.register(BACKEND_NAME, class_path)
    # Instance attribute: only this member pickles by name, the others are untouched.
    member.__dict__["__reduce_ex__"] = lambda protocol: (_unpickle_member, (BACKEND_NAME,))


def selected_backend_name(vllm_config: VllmConfig) -> str | None:
    backend = vllm_config.attention_config.backend
    return None if backend is None else backend.name


def route_cpu_platform_to(class_path: str) -> None:
    """Make the CPU platform return ``class_path`` when HEADKV is selected."""
    if not current_platform.is_cpu():
        return
    cls = type(current_platform)
    if getattr(cls, "_headkv_routed", False):
        return
    original = cls.get_attn_backend_cls.__func__

    def get_attn_backend_cls(c, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend is not None and selected_backend.name == BACKEND_NAME:
            logger.info_once("Using %s backend.", BACKEND_NAME)
            return class_path
        return original(c, selected_backend, attn_selector_config, num_heads)

    cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    cls._headkv_routed = True


def wrap_check_and_update_config(hook: Callable[[VllmConfig], None]) -> None:
    """Call ``hook(vllm_config)`` after the platform's own config checks."""
    cls = type(current_platform)
    if getattr(cls, "_headkv_config_hooked", False):
        return
    original = cls.check_and_update_config.__func__

    def check_and_update_config(c, vllm_config):
        original(c, vllm_config)
        hook(vllm_config)

    cls.check_and_update_config = classmethod(check_and_update_config)
    cls._headkv_config_hooked = True


def keep_headkv_on_v1_runner() -> None:
    """Make vLLM choose Model Runner V1 when HEADKV is selected (patch 3b, below)."""
    cls = VllmConfig
    if getattr(cls, "_headkv_v1_runner", False):
        return
    original = cls._get_v2_model_runner_unsupported_features

    def unsupported_features(self) -> list[str]:
        features = original(self)
        if selected_backend_name(self) == BACKEND_NAME:
            features.append(f"the {BACKEND_NAME} attention backend (it reads the V1 runner's input batch)")
        return features

    cls._get_v2_model_runner_unsupported_features = unsupported_features
    cls._headkv_v1_runner = True


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


def dense_backend_cls() -> type[AttentionBackend]:
    """The stock dense attention backend of this platform (the no-compression path)."""
    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return CPUAttentionBackend
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    return TritonAttentionBackend


# ---------------------------------------------------------------------------
# Per-head paging: KV-cache spec, manager base, worker hooks.
#
# 4. ``KVCacheSpecRegistry.register(HeadKVSpec, HeadKVManager)``.
#    Why: each layer gets its own spec (one KV-cache group per layer, a block is
#    one head page) and a manager that counts head pages.
#    How: public registry; built-in specs register lazily only when the registry
#    is empty, so ``register_all_kvcache_specs`` runs first.
# 5. Worker class: ``parallel_config.worker_cls`` is set to ``HeadKVWorker`` (a
#    subclass of the platform's worker) to turn the layers' specs into per-layer
#    head-page specs and to hand the model runner's input batch (prompt lengths)
#    to the metadata builders.
#    Remove when: ``CommonAttentionMetadata`` carries prompt lengths and backends
#    can customise specs per layer.
# 5b. The model runner's ``get_kv_cache_spec`` (per runner instance).
#    Why: vLLM also builds KV caches from the runner's specs, not the worker's: the
#    CUDA-graph memory profile (``_init_minimal_kv_cache_for_profiling``) does, and
#    stock ``FullAttentionSpec``s there would give HeadKV's builders no budgets.
#    How: the worker wraps its runner's method once, so every caller gets head specs.
#    Remove when: vLLM lets a backend customise specs per layer.
# ---------------------------------------------------------------------------

from vllm.model_executor.models.utils import extract_layer_index  # noqa: E402
from vllm.utils.import_utils import resolve_obj_by_qualname  # noqa: E402
from vllm.utils.math_utils import cdiv  # noqa: E402
from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager  # noqa: E402
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, KVCacheLayout  # noqa: E402
from vllm.config import set_current_vllm_config  # noqa: E402
from vllm.v1.attention.backend import AttentionCGSupport, MultipleOf  # noqa: E402

__all__ += [
    "extract_layer_index", "cdiv", "SingleTypeKVCacheManager", "AttentionSpec",
    "FullAttentionSpec", "KVCacheLayout", "MultipleOf", "register_kv_cache_spec",
    "platform_worker_cls", "metadata_builders", "num_prompt_tokens", "request_ids", "request_extra_args", "live_request_ids", "seq_lens_cpu",
    "head_kv_group_layers", "pin_memory_available", "wrap_runner_kv_cache_spec", "init_profiling_kv_cache",
    "dummy_run", "AttentionCGSupport", "block_table_device_bytes", "block_table_width",
]


def register_kv_cache_spec(spec_cls, manager_cls) -> None:
    from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    register_all_kvcache_specs(None)
    KVCacheSpecRegistry.register(spec_cls, manager_cls, uniform_type_base_spec=spec_cls)


def wrap_runner_kv_cache_spec(model_runner, convert: Callable[[dict], dict]) -> None:
    """``model_runner.get_kv_cache_spec()`` returns ``convert(<the runner's own specs>)``."""
    if getattr(model_runner, "_headkv_specs_wrapped", False):
        return
    original = model_runner.get_kv_cache_spec
    model_runner.get_kv_cache_spec = lambda: convert(original())
    model_runner._headkv_specs_wrapped = True


def init_profiling_kv_cache(model_runner) -> None:
    """(Tests.) What the CUDA-graph memory profile builds first: a minimal KV cache from the
    runner's specs (``GPUModelRunner.profile_cudagraph_memory``)."""
    with set_current_vllm_config(model_runner.vllm_config):
        model_runner._init_minimal_kv_cache_for_profiling()


def dummy_run(model_runner, num_tokens: int, uniform_decode: bool = False, mixed: bool = False) -> None:
    """(Tests.) A dummy batch as vLLM's warm-ups and graph captures run it, with attention
    metadata built (``force_attention``: vLLM does it for full CUDA graphs and some kernel
    warm-ups, neither of which reaches HEADKV, whose builder declares no graph support)."""
    with set_current_vllm_config(model_runner.vllm_config):
        model_runner._dummy_run(num_tokens, force_attention=True, uniform_decode=uniform_decode,
                                create_mixed_batch=mixed, skip_eplb=True, is_profile=True)


def platform_worker_cls() -> type:
    """The worker class this platform uses by default (CPUWorker / GPU Worker)."""
    if current_platform.is_cpu():
        return resolve_obj_by_qualname("vllm.v1.worker.cpu_worker.CPUWorker")
    return resolve_obj_by_qualname("vllm.v1.worker.gpu_worker.Worker")


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


def seq_lens_cpu(cm: CommonAttentionMetadata) -> torch.Tensor:
    """Host copy of ``seq_lens``: vLLM's upper bound is exact without speculative
    decoding (off under HeadKV); the device copy is read only if it is missing."""
    if cm.seq_lens_cpu_upper_bound is not None:
        return cm.seq_lens_cpu_upper_bound
    return cm.seq_lens.cpu()


def pin_memory_available() -> bool:
    from vllm.utils.platform_utils import is_pin_memory_available

    return is_pin_memory_available()


def head_kv_group_layers(model_runner) -> list[tuple[int, int]]:
    """(KV-cache group id, layer index) of every HeadKV group."""
    groups = model_runner.kv_cache_config.kv_cache_groups
    return [(i, g.kv_cache_spec.layer_index) for i, g in enumerate(groups)
            if hasattr(g.kv_cache_spec, "layer_index")]


def kv_cache_group_sizes(kv_cache_config) -> list[int]:
    return [len(g.layer_names) for g in kv_cache_config.kv_cache_groups]


def kv_cache_tensor_offsets(kv_cache_config) -> set[int]:
    return {getattr(t, "offset", 0) for t in kv_cache_config.kv_cache_tensors}


def block_table_device_bytes(model_runner) -> int:
    """Bytes of the runner's block tables on the device, all KV-cache groups."""
    tables = model_runner.input_batch.block_table.block_tables
    return sum(t.block_table.gpu.numel() * t.block_table.gpu.element_size() for t in tables)


def block_table_width(max_num_blocks: int, block_size: int) -> int:
    """Width vLLM gives a group's block table (rounded up to whole 128-token spans)."""
    from vllm.v1.worker.block_table import get_block_table_width

    return get_block_table_width(max_num_blocks, block_size)


def block_table_row_counts(model_runner, group_id: int):
    return model_runner.input_batch.block_table.block_tables[group_id].num_blocks_per_row


# ---------------------------------------------------------------------------
# 6. vLLM's CPU attention ops (``vllm._custom_ops.cpu_attn_*``), reused on the CPU
#    by ``engine.cpu_page_store``: a head page has the shape of a stock CPU block
#    with one KV head, and prefill attention runs on a scratch cache of stock blocks.
#    The cache-write op packs K in an ISA-specific order, so caches it writes are
#    read only by its attention op.
#    Remove when: the signatures change (they follow vLLM's CPU backend).
# ---------------------------------------------------------------------------

from vllm import _custom_ops as _ops  # noqa: E402
from vllm import envs as _envs  # noqa: E402

__all__ += ["cpu_attention_isa", "cpu_cache_write", "cpu_attention_schedule", "cpu_attention"]


def cpu_attention_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
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
# 7. vLLM's variable-length flash attention (``v1/attention/backends/fa_utils``)
#    for HeadKV's prefill attention on CUDA: one call for all prompts of a step.
#    Why: SDPA would run one call per prompt, and its fp32 path is O(n^2) in memory.
#    Remove when: the signature changes (it follows vLLM's FlashAttention backend).
# ---------------------------------------------------------------------------


__all__ += ["flash_prefill_attention"]

from vllm.v1.metrics.loggers import StatLoggerBase  # noqa: E402

__all__ += ["StatLoggerBase"]


def flash_prefill_attention(dtype: torch.dtype, head_size: int):
    """A ``core.prompt_attention.PromptAttention`` over vLLM's flash attention, or None where
    it is not available (CPU, fp32, no flash build)."""
    if not current_platform.is_cuda() or dtype not in (torch.float16, torch.bfloat16):
        return None
    from vllm.v1.attention.backends import fa_utils

    if not fa_utils.is_flash_attn_varlen_func_available():
        return None
    version = fa_utils.get_flash_attn_version(head_size=head_size)
    extra = {} if version is None else {"fa_version": version}

    def attend(q, k, v, plan, scale):
        return fa_utils.flash_attn_varlen_func(
            q, k, v, max_seqlen_q=plan.prefill_max_len, cu_seqlens_q=plan.prefill_cu_seqlens,
            max_seqlen_k=plan.prefill_max_len_k, cu_seqlens_k=plan.prefill_cu_seqlens_k,
            softmax_scale=scale, causal=True, **extra,
        )

    return attend


# ---------------------------------------------------------------------------
# 8. vLLM's real scheduler without a model (``headkv-vllm sched-sim``).
#    Why: the scheduler-side cost of head pages (a block pool hundreds of times
#    larger than stock, one KV-cache group per layer) is measured on vLLM's own
#    ``Scheduler`` / ``KVCacheManager`` / ``BlockPool``, built the way
#    ``EngineCore`` builds them (``get_kv_cache_configs`` from per-layer specs and
#    a byte budget, then ``Scheduler``), and stepped with fake model outputs, as
#    vLLM's own scheduler tests do. Imports are lazy so that engine processes do
#    not pay for them.
#    Remove when: never needed by the engine; update when these signatures change.
# ---------------------------------------------------------------------------

__all__ += [
    "engine_config", "scheduler_kv_cache_config", "build_scheduler", "request_block_hasher",
    "make_request", "model_runner_output", "freeze_gc_heap", "num_free_blocks", "finish_all_requests",
    "resolve_obj_by_qualname", "validate_request_settings", "give_managers_the_requests",
]


def engine_config(**engine_args) -> VllmConfig:
    """``EngineArgs(**engine_args).create_engine_config()`` (platform and plugin hooks run)."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(**engine_args).create_engine_config()


def scheduler_kv_cache_config(vllm_config: VllmConfig, layer_specs: dict, kv_cache_bytes: int,
                              backend_cls: type[AttentionBackend]):
    """The scheduler's ``KVCacheConfig`` for one worker with ``kv_cache_bytes`` of KV cache,
    as ``EngineCore._initialize_kv_caches`` makes it (the KV-cache layout resolved from
    ``backend_cls``'s supported layouts); sets ``cache_config.num_gpu_blocks``."""
    from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts, resolve_kv_cache_layout
    from vllm.v1.core.kv_cache_utils import generate_scheduler_kv_cache_config, get_kv_cache_configs

    layouts = [layout.name for layout in get_supported_kv_cache_layouts([backend_cls])]
    resolve_kv_cache_layout(vllm_config, [layouts], list(layer_specs.values()))
    configs = get_kv_cache_configs(vllm_config, [layer_specs], [kv_cache_bytes])
    config = generate_scheduler_kv_cache_config(configs)
    vllm_config.cache_config.num_gpu_blocks = config.num_blocks
    return config


def build_scheduler(vllm_config: VllmConfig, kv_cache_config):
    """vLLM's V1 ``Scheduler`` (with its ``KVCacheManager`` and ``BlockPool``), as ``EngineCore`` builds it."""
    from vllm.v1.core.kv_cache_utils import resolve_kv_cache_block_sizes
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    block_size, hash_block_size = resolve_kv_cache_block_sizes(kv_cache_config, vllm_config)
    return Scheduler(
        vllm_config=vllm_config, kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size, hash_block_size=hash_block_size, log_stats=False,
    )


def request_block_hasher(vllm_config: VllmConfig, scheduler):
    """The prefix-caching block hasher ``EngineCore`` gives requests, or None when caching is off."""
    if not vllm_config.cache_config.enable_prefix_caching:
        return None
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    return get_request_block_hasher(scheduler.hash_block_size, hash_fn)


def make_request(request_id: str, prompt_token_ids: list[int], max_tokens: int, block_hasher=None):
    """An engine-core ``Request``: greedy, EOS ignored, exactly ``max_tokens`` generated."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    return Request(request_id=request_id, prompt_token_ids=prompt_token_ids, sampling_params=params,
                   pooling_params=None, block_hasher=block_hasher)


def model_runner_output(req_ids: list[str], sampled_token_ids: list[list[int]]):
    """What a model runner returns for one step: one list of sampled tokens per request."""
    from vllm.v1.outputs import ModelRunnerOutput

    return ModelRunnerOutput(req_ids=list(req_ids), req_id_to_index={r: i for i, r in enumerate(req_ids)},
                             sampled_token_ids=sampled_token_ids)


def freeze_gc_heap() -> None:
    """What ``EngineCore`` does after start-up: move the heap to the oldest generation and freeze it."""
    from vllm.utils.gc_utils import freeze_gc_heap as _freeze

    _freeze()


def num_free_blocks(scheduler) -> int:
    return scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def finish_all_requests(scheduler) -> None:
    """Abort every request (as a client disconnect does); their blocks go back to the pool."""
    from vllm.v1.request import RequestStatus

    scheduler.finish_requests(None, RequestStatus.FINISHED_ABORTED)


def validate_request_settings(check: Callable[[VllmConfig, str, object], None]) -> None:
    """Patch 6: ``check(vllm_config, request_id, sampling_params)`` runs for every request
    as it arrives; a ``ValueError`` with a ``field`` becomes vLLM's ``VLLMValidationError``
    (HTTP 400)."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    if getattr(InputProcessor, "_headkv_validates", False):
        return
    original = InputProcessor.process_inputs

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        if isinstance(params, SamplingParams):
            try:
                check(self.vllm_config, request_id, params)
            except ValueError as e:
                raise VLLMValidationError(str(e), parameter=getattr(e, "field", None)) from None
        return original(self, request_id, prompt, params, *args, **kwargs)

    InputProcessor.process_inputs = process_inputs
    InputProcessor._headkv_validates = True


def give_managers_the_requests() -> None:
    """Patch 7: every KV-cache manager with a ``requests`` attribute gets the scheduler's
    requests by id once the scheduler (or its async subclass) is built."""
    from vllm.v1.core.sched.scheduler import Scheduler

    if getattr(Scheduler, "_headkv_requests", False):
        return
    original = Scheduler.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            if hasattr(manager, "requests"):
                manager.requests = self.requests

    Scheduler.__init__ = __init__
    Scheduler._headkv_requests = True


def request_extra_args(model_runner, ids: list[str]) -> list:
    """Each request's ``SamplingParams.extra_args`` (None where it has none)."""
    requests = model_runner.requests
    out = []
    for request_id in ids:
        params = getattr(requests.get(request_id), "sampling_params", None)
        out.append(params.extra_args if params is not None else None)
    return out
