"""Typed plugin settings, read from vLLM's ``additional_config`` under the key ``headkv``.

    vllm serve MODEL --attention-backend headkv \
        --additional-config '{"headkv": {...}}'

Every key is a field of :class:`HeadKVConfig`; unknown keys and ill-typed values
are errors that name the key and say how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Mapping

from headkv_vllm.method.budgets import POLICIES

CONFIG_KEY = "headkv"
PAGE_STORES = ("auto", "block-table", "block-table-triton")
# Upper bounds: a window and pool kernel are loop bounds in the kernels; a kv_size above
# any context length already means "keep everything".
MAX_WINDOW = 1024
MAX_POOL_KERNEL = 63
MAX_KV_SIZE = 2**31 - 1


class HeadKVConfigError(ValueError):
    """Invalid HeadKV settings; the message names the source, the key and the fix."""


def short_repr(value: Any) -> str:
    """``repr`` of a bad value, cut so that an error stays one short paragraph."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclasses.dataclass(frozen=True)
class HeadKVConfig:
    """HeadKV settings (docs/method.md).

    kv_size:      average tokens kept per KV head, window included (the paper's "KV size")
    policy:       'headkv' (score-driven per-head budgets), 'snapkv' (uniform),
                  'pyramidkv' (linear in depth)
    scores:       score file for 'headkv'; default: the file in configs/ whose model
                  identity matches the served model (R2 preferred)
    beta:         'headkv' pool factor (> 1); smaller = more skewed budgets. Unset: the
                  score file's calibrated beta for the KV size (`headkv-vllm calibrate`),
                  else 1.01 (the paper's)
    window:       observation window: the last prompt queries that score, always kept.
                  Unset: the score file's calibrated window ('headkv'), else 8
    pool_kernel:  max-pool kernel over the window scores (odd)
    redistribute: give the budget that a short prompt cannot use to the other heads
    page_store:   'auto' (block-table ops on CUDA, vLLM's CPU ops on the CPU),
                  'block-table' (the CUDA route everywhere; on CPU tensors its ops are
                  the kernels' PyTorch references) or 'block-table-triton' (the CUDA
                  route with its Triton kernels everywhere; on the CPU they run in
                  Triton's interpreter, TRITON_INTERPRET=1): both for tests
    """

    kv_size: int = 128
    policy: str = "headkv"
    scores: str | None = None
    beta: float = 1.01
    window: int = 8
    pool_kernel: int = 7
    redistribute: bool = True
    page_store: str = "auto"
    source: str = dataclasses.field(default="--additional-config", compare=False, repr=False)
    # The settings the user gave; the others may take the score file's calibrated values.
    explicit: frozenset = dataclasses.field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self):
        where = f"{self.source} key '{CONFIG_KEY}'"
        if self.policy not in POLICIES:
            raise HeadKVConfigError(f"{where}: setting 'policy' is {short_repr(self.policy)}; use one of {', '.join(POLICIES)}.")
        if not 1 <= self.window <= MAX_WINDOW:
            raise HeadKVConfigError(
                f"{where}: setting 'window' must be 1 to {MAX_WINDOW}, got {self.window}. Set it in that range (default 8).")
        if self.kv_size <= self.window:
            raise HeadKVConfigError(
                f"{where}: setting 'kv_size' ({self.kv_size}) must exceed 'window' ({self.window}): "
                f"kv_size counts the window. Raise kv_size or lower window."
            )
        if self.kv_size > MAX_KV_SIZE:
            raise HeadKVConfigError(
                f"{where}: setting 'kv_size' ({self.kv_size}) is above {MAX_KV_SIZE}; a kv_size of at least the "
                f"model's context length already keeps every token. Lower kv_size.")
        if not 1 < self.beta < math.inf:
            raise HeadKVConfigError(
                f"{where}: setting 'beta' must be a finite number > 1 (e.g. 1.01, 1.2, 2), got {self.beta}. Fix its value.")
        if not (1 <= self.pool_kernel <= MAX_POOL_KERNEL and self.pool_kernel % 2):
            raise HeadKVConfigError(
                f"{where}: setting 'pool_kernel' must be odd, 1 to {MAX_POOL_KERNEL}, got {self.pool_kernel}. "
                f"Set it in that range (default 7).")
        if self.page_store not in PAGE_STORES:
            raise HeadKVConfigError(
                f"{where}: setting 'page_store' is {short_repr(self.page_store)}; use one of {', '.join(PAGE_STORES)}.")

    @classmethod
    def known_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("source", "explicit")]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, source: str = "--additional-config") -> "HeadKVConfig":
        values = dict(values or {})
        where = f"{source} key '{CONFIG_KEY}'"
        unknown = sorted(set(values) - set(cls.known_keys()))
        if unknown:
            known = ", ".join(cls.known_keys()) or "(none yet)"
            raise HeadKVConfigError(
                f"{where}: unknown setting(s) {', '.join(map(short_repr, unknown))}. "
                f"Known settings: {known}. Remove or rename the unknown ones."
            )
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            _check_type(where, key, value, hints[key])
        return cls(source=source, explicit=frozenset(values), **values)

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> "HeadKVConfig":
        if additional_config is None:
            return cls()
        if not isinstance(additional_config, Mapping):
            raise HeadKVConfigError(
                f"--additional-config must be a JSON object, got {type(additional_config).__name__}; "
                f"pass '{{\"{CONFIG_KEY}\": {{...}}}}'."
            )
        section = additional_config.get(CONFIG_KEY, {})
        if not isinstance(section, Mapping):
            raise HeadKVConfigError(
                f"--additional-config key '{CONFIG_KEY}' must be a JSON object of settings, "
                f"got {short_repr(section)}; pass '{{\"{CONFIG_KEY}\": {{\"key\": value}}}}'."
            )
        return cls.from_mapping(section)


def _check_type(where: str, key: str, value: Any, hint: Any) -> None:
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    allowed = tuple(typing.get_origin(a) or a for a in allowed)
    ok = any(
        (a is type(None) and value is None)
        or (a is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (a is int and isinstance(value, int) and not isinstance(value, bool))
        or (a not in (int, float, type(None)) and isinstance(value, a))
        for a in allowed
    )
    if not ok:
        names = " or ".join("null" if a is type(None) else a.__name__ for a in allowed)
        raise HeadKVConfigError(f"{where}: setting '{key}' must be {names}, got {short_repr(value)}. Fix its value.")

