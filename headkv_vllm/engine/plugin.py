"""vLLM general plugin: registers the HEADKV attention backend.

vLLM calls :func:`register` in every process (API server, engine core, workers),
possibly several times; it is idempotent. vLLM's entry point, ``headkv_vllm.register``,
imports this module (and with it vLLM) only when vLLM calls it.
"""

from __future__ import annotations

import sys

from headkv_vllm.engine import vllm_patches
from headkv_vllm.engine.kv_spec import HeadKVManager, HeadKVSpec
from headkv_vllm.engine.metrics import note_request_kv_size
from headkv_vllm.engine.version import check_vllm_version, installed_vllm_version
from headkv_vllm.engine.settings import apply_engine_settings, headkv_from_vllm_config, served_window
from headkv_vllm.engine.vllm_access import (
    BACKEND_NAME,
    AttentionBackendEnum,
    logger,
    selected_backend_name,
)
from headkv_vllm.method import request_settings
from headkv_vllm.method.config import HeadKVConfigError

BACKEND_PATH = "headkv_vllm.engine.backend.HeadKVBackend"

_registered = False


def register() -> None:
    """Applies vLLM patches 1-8 (``engine.vllm_patches``)."""
    global _registered
    if _registered:
        return
    check_vllm_version(installed_vllm_version())
    vllm_patches.register_backend_member(BACKEND_PATH, unpickle_backend_member)
    vllm_patches.route_cpu_platform_to(BACKEND_PATH)
    vllm_patches.wrap_check_and_update_config(on_engine_config)
    vllm_patches.keep_headkv_on_v1_runner()
    vllm_patches.register_kv_cache_spec(HeadKVSpec, HeadKVManager)
    vllm_patches.validate_request_settings(check_request_settings)
    vllm_patches.give_managers_the_requests()
    install_config_error_hook()
    _registered = True


def unpickle_backend_member(name: str) -> AttentionBackendEnum:
    """How ``AttentionBackendEnum.HEADKV`` unpickles (patch 1): a spawned process may
    unpickle the engine config before vLLM has loaded its plugins."""
    register()
    return AttentionBackendEnum[name]


def check_request_settings(vllm_config, request_id: str, sampling_params) -> None:
    """A request's ``headkv_*`` extra args, checked as it arrives (``vllm_patches`` patch 7);
    its own KV size is noted for the metrics."""
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
    """Runs once, in the first process, while the engine config is finalised (patch 3)."""
    if selected_backend_name(vllm_config) != BACKEND_NAME:
        return
    # Bad settings or score files fail here, before the engine starts.
    config, _, _ = headkv_from_vllm_config(vllm_config)
    apply_engine_settings(vllm_config, config, logger)
