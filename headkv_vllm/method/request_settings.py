"""Per-request HeadKV settings: the ``headkv_*`` keys of a request's ``vllm_xargs``
(the OpenAI request's extra body) or ``SamplingParams.extra_args`` (Python).

    {"vllm_xargs": {"headkv_kv_size": 64}}      this request keeps 64 tokens per KV head on average
    {"vllm_xargs": {"headkv_kv_size": "full"}}  this request is not compressed

The request's KV size replaces the server's ``kv_size`` for its budgets (same policy,
head scores, beta and window). Checked when the request arrives (``check``); a bad
value never reaches the engine.
"""

from __future__ import annotations

from typing import Any, Mapping

from headkv_vllm.method.budgets import FULL
from headkv_vllm.method.config import MAX_KV_SIZE, short_repr

PREFIX = "headkv_"
KV_SIZE = "headkv_kv_size"
KNOWN = (KV_SIZE,)


class RequestSettingError(ValueError):
    """A bad per-request setting; the message names the field and the allowed values."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def check(extra_args: Mapping[str, Any] | None, window: int | None) -> None:
    """Raise :class:`RequestSettingError` for a bad ``headkv_*`` key. ``window``: the
    server's observation window, or None when the server does not run HEADKV."""
    for key, value in (extra_args or {}).items():
        if not str(key).startswith(PREFIX):
            continue
        field = f"vllm_xargs.{key}"
        if window is None:
            raise RequestSettingError(
                f"{field}: this server does not run HeadKV (vllm serve ... --attention-backend headkv); "
                f"remove the '{PREFIX}' keys.", field)
        if key not in KNOWN:
            raise RequestSettingError(
                f"{field}: not a HeadKV per-request setting; the known one is '{KV_SIZE}'. Remove or rename it.", field)
        if value == FULL:
            continue
        if type(value) is not int or not window < value <= MAX_KV_SIZE:
            raise RequestSettingError(
                f"{field} must be an integer above the server's window ({window}) and at most {MAX_KV_SIZE} "
                f"(average tokens kept per KV head), or \"{FULL}\" (no compression); got {short_repr(value)}.", field)


def request_kv_size(extra_args: Mapping[str, Any] | None) -> int | str | None:
    """The request's KV size (checked on arrival), or None: the server's. A value that
    skipped the check (an engine-core request made by hand) and is no size at all counts
    as None, the same on the scheduler and the worker, rather than failing in the engine."""
    value = extra_args.get(KV_SIZE) if extra_args else None
    if value == FULL or (type(value) is int and 0 < value <= MAX_KV_SIZE):
        return value
    return None
