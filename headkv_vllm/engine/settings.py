"""HeadKV settings that come from the engine config: budgets for the served model,
and the engine options HeadKV needs (applied once, in the first process)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from headkv_vllm.method.budgets import POLICIES, BudgetRule, Budgets
from headkv_vllm.method.config import CONFIG_KEY, HeadKVConfig, HeadKVConfigError
from headkv_vllm.method.scores import (ModelIdentity, ScoreFileError, find_score_file, identity_from_hf_config,
                                       load_scores, score_files_note)

WORKER_CLS = "headkv_vllm.engine.worker.HeadKVWorker"
DEFAULT_BLOCK_SIZE = 16  # partially filled last pages cost ~1-4% at an average budget of 128


def resolve_budgets(config: HeadKVConfig, model: ModelIdentity) -> tuple[Budgets, str]:
    """The budget table for ``model`` and a description of where it came from."""
    rule, origin = resolve_budget_rule(config, model)
    return rule.budgets(), origin


def resolve_budget_rule(config: HeadKVConfig, model: ModelIdentity) -> tuple[BudgetRule, str]:
    """How KV sizes become budgets for ``model`` (the server's and per-request ones), and
    a description of where its scores came from."""
    if config.policy != "headkv":
        return BudgetRule.from_config(config, model.num_layers, model.num_kv_heads), POLICIES[config.policy]
    path = config.scores or find_score_file(model)
    if path is None:
        raise HeadKVConfigError(
            f"{config.source} key '{CONFIG_KEY}': policy 'headkv' needs head scores, and no file in configs/ "
            f"matches the model '{model.name}' ({model.num_layers} layers, {model.num_query_heads} query heads, "
            f"{model.num_kv_heads} KV heads, head_dim {model.head_dim}). {score_files_note()} "
            f"Fix: set 'scores' to a score file for this model (`headkv-vllm score-heads`), "
            f"or use 'policy': 'snapkv' or 'pyramidkv'."
        )
    try:
        scores = load_scores(path)
        scores.check_model(model)
    except ScoreFileError as e:
        raise HeadKVConfigError(f"{config.source} key '{CONFIG_KEY}' setting 'scores': {e}") from None
    cal, betas, origin = scores.calibration, (), f"scores {path} (probe {scores.probe})"
    if cal is not None:
        if cal.window is not None and "window" not in config.explicit:
            if config.kv_size <= cal.window:
                raise HeadKVConfigError(
                    f"{config.source} key '{CONFIG_KEY}': setting 'kv_size' ({config.kv_size}) must exceed the window "
                    f"{cal.window} calibrated in {path} (key 'calibration.window'). Raise kv_size, or set 'window'.")
            config = dataclasses.replace(config, window=cal.window)
        # betas calibrated at another window than the one served do not carry over
        if "beta" not in config.explicit and (cal.window is None or config.window == cal.window):
            betas = cal.betas
        used = [f"window {config.window}"] if cal.window is not None and "window" not in config.explicit else []
        used += ["beta per KV size " + ", ".join(f"{k}: {b:g}" for k, b in betas)] if betas else []
        origin += f", calibrated {' and '.join(used)}" if used else ", its calibration overridden by the settings"
    rule = BudgetRule.from_config(config, model.num_layers, model.num_kv_heads, scores.kv_head_scores, betas)
    return rule, origin


def headkv_from_vllm_config(vllm_config) -> tuple[HeadKVConfig, BudgetRule, str]:
    """The settings as served (a calibrated window and beta filled in where the user set
    none), the budget rule and where the budgets came from."""
    config = HeadKVConfig.from_additional_config(vllm_config.additional_config)
    model_config = vllm_config.model_config
    model = identity_from_hf_config(model_config.hf_text_config, Path(str(model_config.model)).name)
    rule, origin = resolve_budget_rule(config, model)
    return served_config(config, rule), rule, origin


def served_config(config: HeadKVConfig, rule: BudgetRule) -> HeadKVConfig:
    """``config`` with the window and beta ``rule`` serves at its KV size (calibrated ones
    included), marked as set so that resolving it again changes nothing."""
    return dataclasses.replace(config, window=rule.window, beta=rule.beta_for(config.kv_size),
                               explicit=config.explicit | {"window", "beta"})


def served_window(vllm_config) -> int:
    """The served observation window (a calibrated one included), read once per engine config."""
    key = id(vllm_config)
    if key not in _SERVED_WINDOW:
        _SERVED_WINDOW[key] = (vllm_config, headkv_from_vllm_config(vllm_config)[0].window)
    return _SERVED_WINDOW[key][1]


_SERVED_WINDOW: dict[int, tuple] = {}  # id -> (the config, kept alive so that its id stays its own, window)


def apply_engine_settings(vllm_config, config: HeadKVConfig, logger) -> None:
    """Engine options HeadKV needs; each change is logged with its reason."""
    # Here, not at the top: the tools read budgets through this module without loading vLLM.
    from headkv_vllm.engine import vllm_access

    sched, cache, par = vllm_config.scheduler_config, vllm_config.cache_config, vllm_config.parallel_config
    too_parallel = {k: v for k, v in vllm_access.parallel_sizes(vllm_config).items() if v > 1}
    if too_parallel:
        opts = ", ".join(f"{k} {v}" for k, v in too_parallel.items())
        raise HeadKVConfigError(
            f"{opts}: HeadKV runs on one GPU per model replica for now (its head budgets and page "
            f"accounting are not split across ranks yet). Remove {', '.join(too_parallel)}.")
    if vllm_access.uses_v2_model_runner(vllm_config):
        raise HeadKVConfigError(
            "Model Runner V2 is selected (VLLM_USE_V2_MODEL_RUNNER=1, or a feature that needs V2 such as "
            "HiSparse or watermarking): HeadKV runs on Model Runner V1 (it reads V1's input batch). Unset "
            "VLLM_USE_V2_MODEL_RUNNER and drop V2-only features; vLLM then picks V1 for HEADKV by itself.")
    if config.page_store == "block-table-triton" and vllm_access.current_platform.is_cpu() \
            and os.environ.get("TRITON_INTERPRET") != "1":
        raise HeadKVConfigError(
            f"{config.source} key '{CONFIG_KEY}' setting 'page_store' is 'block-table-triton': on the CPU "
            "its Triton kernels run only in Triton's interpreter. Set TRITON_INTERPRET=1 in the engine's "
            "environment, or use 'page_store': 'block-table' (the kernels' PyTorch references).")
    if vllm_config.speculative_config is not None:
        raise HeadKVConfigError(
            "--speculative-config: HeadKV does not support speculative decoding (each step must decode one "
            "token per request); remove --speculative-config or use another --attention-backend.")
    if par.use_ubatching:
        raise HeadKVConfigError(
            "--enable-dbo / --ubatch-size: HeadKV builds one step plan for the whole batch and does not "
            "support micro-batching; remove those options.")
    if cache.enable_prefix_caching:
        cache.enable_prefix_caching = False
        logger.info("HeadKV: prefix caching disabled: compressed pages are per request and cannot be shared.")
    if sched.enable_chunked_prefill:
        logger.info(
            "HeadKV: chunked prefill on (max_num_batched_tokens %d): a prompt longer than a step's "
            "token budget is prefilled in chunks, every KV head uncompressed, and compressed at its "
            "last chunk, where its surplus head pages go back to the pool.", sched.max_num_batched_tokens,
        )
    else:
        logger.info("HeadKV: chunked prefill off (as configured): each prompt is prefilled and compressed in one step.")
    if not cache.user_specified_block_size:
        cache.block_size = DEFAULT_BLOCK_SIZE
    if par.worker_cls in ("auto", _qualname(vllm_access.platform_worker_cls())):
        par.worker_cls = WORKER_CLS
    elif par.worker_cls != WORKER_CLS:
        raise HeadKVConfigError(
            f"--worker-cls {par.worker_cls}: HeadKV needs its own worker ({WORKER_CLS}); remove --worker-cls."
        )


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
