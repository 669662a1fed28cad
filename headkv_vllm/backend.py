"""The HEADKV attention backend: static declarations (Backend), once-per-step
host work (MetadataBuilder) and the per-layer forward (Impl).

This first version does not compress: it inherits the platform's dense attention
(CPU_ATTN on the CPU, TRITON_ATTN on CUDA) so that ``--attention-backend headkv``
serves with outputs identical to stock vLLM. The per-head paged cache replaces the
insides of these three classes, not their shape.
"""

from __future__ import annotations

from headkv_vllm.vllm_compat import BACKEND_NAME, dense_backend_cls

_Dense = dense_backend_cls()


class HeadKVMetadataBuilder(_Dense.get_builder_cls()):
    """Builds the step's attention metadata once for all layers of a KV-cache group."""


class HeadKVImpl(_Dense.get_impl_cls()):
    """Per-layer attention forward."""


class HeadKVBackend(_Dense):
    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[HeadKVImpl]:
        return HeadKVImpl

    @staticmethod
    def get_builder_cls() -> type[HeadKVMetadataBuilder]:
        return HeadKVMetadataBuilder
