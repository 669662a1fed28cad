"""What the plugin changes in vLLM: every patch, numbered, applied once per process
(idempotently) from ``engine.plugin.register``.

Target: vLLM 0.32.x (V1 engine). Accessors of vLLM internals, and the list of places
outside these two modules that rely on vLLM's private behaviour, are in
``engine.vllm_access``.

1. ``AttentionBackendEnum.HEADKV``: a dynamic enum member.
   Why: ``--attention-backend headkv`` is parsed as ``AttentionBackendEnum["HEADKV"]``.
   How: ``AttentionBackendEnum.register``; the member gets a ``__reduce_ex__`` that
   unpickles through the plugin's own function, which registers the plugin first:
   engine-core and worker processes are spawned and unpickle the config before their
   plugins load.
   Remove when: vLLM pickles dynamic backend members by name.
2. ``CpuPlatform.get_attn_backend_cls``.
   Why: the CPU platform ignores the selected backend and always returns CPU_ATTN.
   How: wrapped; returns our backend's path when HEADKV is selected.
   Remove when: the CPU platform honours ``--attention-backend``.
3. ``Platform.check_and_update_config`` of the current platform.
   Why: HeadKV needs engine settings (validated plugin config, no prefix caching, its
   worker class) applied once, in the first process, before the engine starts.
   How: wrapped; calls the plugin's hook after the platform's own checks.
   Remove when: vLLM offers a config hook to general plugins.
4. ``VllmConfig._get_v2_model_runner_unsupported_features``.
   Why: Model Runner V2 is vLLM's default on CUDA; HeadKV reads the V1 runner's input
   batch (prompt lengths, request ids, block-table row counts).
   How: wrapped; lists the HEADKV backend as unsupported when it is selected, so vLLM
   itself picks V1 before the engine starts and logs why.
   Remove when: HeadKV supports V2's input buffers.
5. ``KVCacheSpecRegistry``: ``HeadKVSpec`` -> ``HeadKVManager``.
   Why: each layer gets its own spec (one KV-cache group per layer, a block is one
   head page) and a manager that counts head pages.
   How: the public registry, after ``register_all_kvcache_specs``: vLLM registers its
   built-in specs only while the registry is empty, so ours first would drop theirs.
   Remove when: built-in specs register regardless of what is already there.
6. The model runner's ``get_kv_cache_spec`` (per runner instance, from
   ``HeadKVWorker.init_device``).
   Why: vLLM also builds KV caches from the runner's specs, not the worker's: the
   CUDA-graph memory profile (``_init_minimal_kv_cache_for_profiling``) does, and
   stock ``FullAttentionSpec``s there would give HeadKV's builders no budgets.
   How: wrapped once per runner, so every caller gets head-page specs.
   Remove when: vLLM lets a backend customise specs per layer.
7. ``InputProcessor.process_inputs``.
   Why: per-request HeadKV settings (``vllm_xargs`` / ``SamplingParams.extra_args``
   keys ``headkv_*``) must be refused with HTTP 400 before they reach the engine;
   vLLM passes unknown extra args through unchecked.
   How: wrapped; runs the plugin's check first and raises vLLM's
   ``VLLMValidationError`` (400, the field named); the check also notes the request's
   own KV size for the metrics (``engine.metrics``).
   Remove when: vLLM lets plugins validate extra args.
8. ``Scheduler.__init__``.
   Why: a request's own KV size sets its page count from its first allocation, and the
   KV-cache managers see only request ids.
   How: wrapped; hands the scheduler's ``requests`` dict to every manager that has a
   ``requests`` attribute (``HeadKVManager``).
   Remove when: managers receive the request (or its sampling params).
"""

from __future__ import annotations

from typing import Callable

from vllm.config import VllmConfig
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs
from vllm.v1.engine.input_processor import InputProcessor
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from headkv_vllm.engine.vllm_access import (
    BACKEND_NAME,
    AttentionBackendEnum,
    current_platform,
    logger,
    selected_backend_name,
)


def register_backend_member(class_path: str, unpickle: Callable[[str], AttentionBackendEnum]) -> None:
    """Patch 1: ``AttentionBackendEnum.HEADKV`` -> ``class_path`` (idempotent). The member
    pickles as ``unpickle(BACKEND_NAME)``: a module-level function that registers the
    plugin in the unpickling process and returns ``AttentionBackendEnum[name]``."""
    if BACKEND_NAME in AttentionBackendEnum.__members__:
        return
    member = AttentionBackendEnum.register(BACKEND_NAME, class_path)
    # Instance attribute: only this member pickles through ``unpickle``, the others are untouched.
    member.__dict__["__reduce_ex__"] = lambda protocol: (unpickle, (BACKEND_NAME,))


def route_cpu_platform_to(class_path: str) -> None:
    """Patch 2: the CPU platform returns ``class_path`` when HEADKV is selected."""
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
    """Patch 3: ``hook(vllm_config)`` runs after the platform's own config checks."""
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
    """Patch 4: vLLM chooses Model Runner V1 when HEADKV is selected."""
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


def register_kv_cache_spec(spec_cls: type, manager_cls: type) -> None:
    """Patch 5: vLLM's KV-cache managers use ``manager_cls`` for ``spec_cls`` layers."""
    register_all_kvcache_specs(None)
    KVCacheSpecRegistry.register(spec_cls, manager_cls, uniform_type_base_spec=spec_cls)


def wrap_runner_kv_cache_spec(model_runner, convert: Callable[[dict], dict]) -> None:
    """Patch 6: ``model_runner.get_kv_cache_spec()`` returns ``convert(<the runner's own specs>)``."""
    if getattr(model_runner, "_headkv_specs_wrapped", False):
        return
    original = model_runner.get_kv_cache_spec
    model_runner.get_kv_cache_spec = lambda: convert(original())
    model_runner._headkv_specs_wrapped = True


def validate_request_settings(check: Callable[[VllmConfig, str, SamplingParams], None]) -> None:
    """Patch 7: ``check(vllm_config, request_id, sampling_params)`` runs for every request
    as it arrives; a ``ValueError`` with a ``field`` becomes vLLM's ``VLLMValidationError``
    (HTTP 400)."""
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
    """Patch 8: every KV-cache manager with a ``requests`` attribute gets the scheduler's
    requests by id once the scheduler (or its async subclass) is built."""
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
