"""The worker HeadKV runs on: the platform's own worker plus the per-head page specs."""

from __future__ import annotations

from headkv_vllm.engine.backend import HeadKVMetadataBuilder, choose_page_store
from headkv_vllm.engine.kv_spec import block_table_bytes, to_head_specs
from headkv_vllm.engine.settings import headkv_from_vllm_config
from headkv_vllm.engine.step_planner import StepPlanner
from headkv_vllm.engine.vllm_access import (
    kv_cache_group_sizes,
    kv_cache_tensor_offsets,
    logger,
    metadata_builders,
    platform_worker_cls,
)
from headkv_vllm.engine.vllm_patches import wrap_runner_kv_cache_spec


class HeadKVWorker(platform_worker_cls()):
    def init_device(self):
        super().init_device()
        self._headkv_config, self._rule, self._budget_origin = headkv_from_vllm_config(self.vllm_config)
        self._budgets = self._rule.budgets()
        # Every KV cache vLLM builds from this runner (the CUDA-graph memory profile's
        # included) gets head-page specs (vllm_patches patch 6).
        sched = self.vllm_config.scheduler_config
        chunk_tokens = sched.max_num_batched_tokens if sched.enable_chunked_prefill else 0
        wrap_runner_kv_cache_spec(self.model_runner, lambda specs: to_head_specs(specs, self._budgets, chunk_tokens, self._rule))

    def determine_available_memory(self) -> int:
        available = super().determine_available_memory()
        if self.cache_config.kv_cache_memory_bytes is not None:
            return available  # the user's KV-cache size, taken as is (vLLM skips profiling then)
        tables = block_table_bytes(self.model_runner.get_kv_cache_spec(), self.vllm_config)
        logger.info("HeadKV: %.1f MiB of the KV-cache memory go to the head-page block tables "
                    "(%d layers x %d request slots).", tables / 2**20, self._budgets.num_layers,
                    self.scheduler_config.max_num_seqs)
        return max(0, available - tables)

    def initialize_from_config(self, kv_cache_config) -> None:
        sizes = kv_cache_group_sizes(kv_cache_config)
        if any(n != 1 for n in sizes):
            raise RuntimeError(f"HeadKV needs one KV-cache group per layer, vLLM made groups of {sizes}.")
        if kv_cache_tensor_offsets(kv_cache_config) != {0}:
            raise RuntimeError("HeadKV needs every layer's pages to alias one pool (all tensors at offset 0).")
        super().initialize_from_config(kv_cache_config)
        # One plan per step and one page store for all layers' builders.
        builders = [b for b in metadata_builders(self.model_runner) if isinstance(b, HeadKVMetadataBuilder)]
        first = builders[0]
        self.step_planner = StepPlanner(self._budgets, self.cache_config.block_size, first.device, self._rule)
        self.step_planner.bind_runner(self.model_runner)
        store = choose_page_store(self.vllm_config, first.kv_cache_spec, first.device)
        for builder in builders:
            builder.bind(self.step_planner, store)
        c, s = self._headkv_config, self._budgets.summary()
        logger.info(
            "HeadKV: policy=%s kv_size=%d window=%d budgets per KV head (window included) "
            "min/mean/max=%d/%.1f/%d from %s; pool=%d head pages of %d tokens (%d layers x %d KV heads); "
            "page store %s.",
            c.policy, c.kv_size, c.window, s["min"], s["mean"], s["max"], self._budget_origin,
            kv_cache_config.num_blocks, self.cache_config.block_size, self._budgets.num_layers,
            self._budgets.num_kv_heads, type(store).__name__,
        )
