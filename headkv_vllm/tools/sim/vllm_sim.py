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
from vllm.v1.worker.block_table import MultiGroupBlockTable

__all__ = [
    "engine_config", "full_attention_specs", "dense_backend_cls", "backend_cls", "scheduler_kv_cache_config",
    "build_scheduler", "request_block_hasher", "make_request", "model_runner_output", "freeze_gc_heap",
    "num_free_blocks", "finish_all_requests", "RunnerTables",
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


def make_request(request_id: str, prompt_token_ids: list[int], max_tokens: int, block_hasher=None,
                 extra_args: dict | None = None) -> Request:
    """An engine-core ``Request``: greedy, EOS ignored, exactly ``max_tokens`` generated;
    ``extra_args`` as a client's ``vllm_xargs`` (a request's own HEADKV KV size)."""
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0,
                            extra_args=extra_args)
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


class RunnerTables:
    """The V1 model runner's block tables (``MultiGroupBlockTable``), fed every step as
    the runner feeds them, and their host-to-device traffic, without a GPU.

    Built as ``GPUModelRunner.may_reinitialize_input_batch`` builds them (one table per
    KV-cache group, its width from the group spec's ``max_num_blocks_per_req``); the host
    side is real, the device side is on the ``meta`` device (shapes, no memory). ``step``
    applies a ``SchedulerOutput`` as ``_update_states`` does (rows of finished and
    preempted requests cleared, new and resumed requests' rows written, running requests'
    new block ids appended), then ``commit_block_table`` as ``_prepare_inputs`` does, and
    returns the bytes that commit copied to the device (measured on the copies made)."""

    def __init__(self, vllm_config: VllmConfig, kv_cache_config):
        groups = kv_cache_config.kv_cache_groups
        max_len = vllm_config.model_config.max_model_len
        self.max_num_reqs = vllm_config.scheduler_config.max_num_seqs
        self.table = MultiGroupBlockTable(
            max_num_reqs=self.max_num_reqs,
            max_num_batched_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
            pin_memory=False, device=torch.device("meta"),
            block_sizes=[g.kv_cache_spec.block_size for g in groups],
            max_num_blocks=[g.kv_cache_spec.max_num_blocks_per_req(vllm_config, max_len) for g in groups])
        self.rows: dict[str, int] = {}
        self.copied = 0
        for block_table in self.table.block_tables:
            buffer = block_table.block_table
            copy = buffer.copy_to_gpu

            def counted(n=None, _copy=copy):
                out = _copy(n)
                self.copied += out.nbytes
                return out

            buffer.copy_to_gpu = counted

    def device_bytes(self) -> int:
        """The device tensors the tables keep: block tables and slot mappings, every group."""
        return sum(bt.block_table.gpu.nbytes + bt.slot_mapping.gpu.nbytes for bt in self.table.block_tables)

    def host_bytes(self) -> int:
        return sum(bt.block_table.cpu.nbytes + bt.slot_mapping.cpu.nbytes for bt in self.table.block_tables)

    def step(self, out) -> int:
        for req_id in (*out.finished_req_ids, *(out.preempted_req_ids or ())):
            if req_id in self.rows:
                self.table.clear_row(self.rows.pop(req_id))
        for new in out.scheduled_new_reqs:
            self.table.add_row(new.block_ids, self._free_row(new.req_id))
        cached = out.scheduled_cached_reqs
        for req_id, new_ids in zip(cached.req_ids, cached.new_block_ids):
            if req_id in cached.resumed_req_ids:
                self.table.add_row(new_ids, self._free_row(req_id))
            elif new_ids is not None:
                self.table.append_row(new_ids, self.rows[req_id])
        before = self.copied
        self.table.commit_block_table(max(self.rows.values(), default=-1) + 1)
        return self.copied - before

    def _free_row(self, req_id: str) -> int:
        used = set(self.rows.values())
        row = next(i for i in range(self.max_num_reqs) if i not in used)
        self.rows[req_id] = row
        return row
