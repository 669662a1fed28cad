"""The HEADKV attention backend over per-head pages (docs/kv_layout.md): vLLM's
three classes, thin over the compute core (``headkv_vllm.core``).

- ``HeadKVBackend``: static declarations.
- ``HeadKVMetadataBuilder.build``: runs once per layer per step (each layer is its
  own KV-cache group); returns the step plan, built once per step by the worker's
  ``StepPlanner``, with the page store's state for the layer's block table.
- ``HeadKVImpl.forward``: ``core.attention.HeadAttention.forward``.

The page store is chosen once per worker (``choose_page_store``): on CUDA the
block-table store (Triton kernels, no host work per layer; prompts through vLLM's
flash attention); on the CPU vLLM's own CPU cache and attention ops
(``engine.cpu_page_store``).
"""

from __future__ import annotations

import torch

from headkv_vllm.core.attention import HeadAttention, LayerStep
from headkv_vllm.core.page_store import BlockTablePageStore, PageStore
from headkv_vllm.core.prompt_attention import sdpa_prefill
from headkv_vllm.engine.cpu_page_store import CpuPageStore
from headkv_vllm.engine.kv_spec import HeadKVSpec
from headkv_vllm.engine.step_planner import StepPlanner
from headkv_vllm.engine.vllm_access import (
    BACKEND_NAME,
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    KVCacheLayout,
    MultipleOf,
    flash_prefill_attention,
    get_current_vllm_config,
)
from headkv_vllm.method.config import HeadKVConfig


def choose_page_store(vllm_config, kv_cache_spec, device) -> PageStore:
    """The block-table store on CUDA (or when the ``page_store`` setting says
    ``block-table`` or ``block-table-triton``), vLLM's CPU ops on the CPU."""
    config = HeadKVConfig.from_additional_config(vllm_config.additional_config)
    bs, head_size, model = kv_cache_spec.block_size, kv_cache_spec.head_size, vllm_config.model_config
    if torch.device(device).type != "cpu" or config.page_store != "auto":
        flash = flash_prefill_attention(model.dtype, head_size)
        use_triton = True if config.page_store == "block-table-triton" else None
        return BlockTablePageStore(bs, device, use_triton=use_triton, prompt_attention=flash or sdpa_prefill)
    num_heads = model.get_num_attention_heads(vllm_config.parallel_config)
    return CpuPageStore(model.dtype, bs, head_size, num_heads, kv_cache_spec.num_kv_heads)


class HeadKVMetadataBuilder(AttentionMetadataBuilder[LayerStep]):
    """Per layer and step: the shared step plan plus the page store's state for this
    layer's block table. The worker binds one ``StepPlanner`` and one page store to
    every builder; an unbound builder (a KV cache vLLM builds for itself, e.g. to
    profile CUDA-graph memory) plans on its own.

    No CUDA graph ever holds HeadKV attention: the step plan is built on the host
    from each step's lengths. vLLM then captures piecewise graphs around the
    attention layers (its default FULL_AND_PIECEWISE resolves to PIECEWISE), and its
    profiling, capture and warm-up runs build no attention metadata for them (the
    forward gets None). Should a dummy batch reach the builder anyway (vLLM builds
    metadata for dummy runs only for full graphs and some kernels' warm-ups), the
    step planner plans it as fresh prompts."""

    _cudagraph_support = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if not isinstance(kv_cache_spec, HeadKVSpec):
            raise RuntimeError(
                f"HEADKV layers {layer_names} got a {type(kv_cache_spec).__name__}: a KV cache was built from "
                "specs that did not pass through HeadKVWorker (engine.vllm_patches patch 6).")
        self.layer = kv_cache_spec.layer_index
        self.planner: StepPlanner | None = None
        self.store: PageStore | None = None

    def bind(self, planner: StepPlanner, store: PageStore) -> None:
        self.planner, self.store = planner, store

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False) -> LayerStep:
        if self.planner is None:  # not bound by the worker: plan alone
            spec = self.kv_cache_spec
            self.bind(StepPlanner(spec.budgets, spec.block_size, self.device, spec.rule),
                      choose_page_store(self.vllm_config, spec, self.device))
        plan = self.planner.plan(common_attn_metadata)
        return LayerStep(plan, self.layer, self.store,
                         self.store.layer_state(plan, self.layer, common_attn_metadata.block_table_tensor))


class HeadKVImpl(AttentionImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None, **kwargs):
        unsupported = {
            "alibi_slopes": alibi_slopes, "sliding_window": sliding_window, "logits_soft_cap": logits_soft_cap,
            "kv_sharing_target_layer_name": kv_sharing_target_layer_name, "sinks": sinks,
        }
        used = [k for k, v in unsupported.items() if v]
        if used or attn_type != AttentionType.DECODER or kv_cache_dtype not in ("auto", None):
            raise NotImplementedError(
                f"HEADKV supports plain decoder self-attention with an unquantised KV cache; "
                f"this layer uses {used or attn_type or kv_cache_dtype}. Use another --attention-backend."
            )
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = None
        config = HeadKVConfig.from_additional_config(get_current_vllm_config().additional_config)
        self.attention = HeadAttention(num_heads, num_kv_heads, head_size, self.scale, config.pool_kernel)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata: LayerStep | None, output,
                output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("HEADKV does not fuse output quantisation.")
        if attn_metadata is None:  # profiling run
            return output
        num_blocks, _, block_size, _ = kv_cache.shape
        pages = kv_cache.view(num_blocks, 2, block_size, self.head_size)
        return self.attention.forward(attn_metadata, query, key, value, pages, output)


class HeadKVBackend(AttentionBackend):
    forward_includes_kv_cache_update = True  # the impl writes each head's kept tokens itself
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes = ["auto"]  # head pages hold the model's dtype; no KV quantisation

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[HeadKVImpl]:
        return HeadKVImpl

    @staticmethod
    def get_builder_cls() -> type[HeadKVMetadataBuilder]:
        return HeadKVMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return [MultipleOf(1)]

    @classmethod
    def supported_kv_cache_layouts(cls):
        return (KVCacheLayout.LBHNC,)
