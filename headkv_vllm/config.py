"""Typed plugin settings, read from vLLM's ``additional_config`` under the key ``headkv``.

    vllm serve MODEL --attention-backend headkv \
        --additional-config '{"headkv": {...}}'

Every key is a field of :class:`HeadKVConfig`; unknown keys and ill-typed values
are errors that name the key and say how to fix it.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

CONFIG_KEY = "headkv"


class HeadKVConfigError(ValueError):
    """Invalid HeadKV settings; the message names the source, the key and the fix."""


@dataclasses.dataclass(frozen=True)
class HeadKVConfig:
    """HeadKV settings. Later features add fields here (with ranges checked in
    ``__post_init__``); parsing and error reporting stay generic."""

    source: str = dataclasses.field(default="--additional-config", compare=False, repr=False)

    @classmethod
    def known_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "source"]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, source: str = "--additional-config") -> "HeadKVConfig":
        values = dict(values or {})
        where = f"{source} key '{CONFIG_KEY}'"
        unknown = sorted(set(values) - set(cls.known_keys()))
        if unknown:
            known = ", ".join(cls.known_keys()) or "(none yet)"
            raise HeadKVConfigError(
                f"{where}: unknown setting(s) {', '.join(map(repr, unknown))}. "
                f"Known settings: {known}. Remove or rename the unknown ones."
            )
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            _check_type(where, key, value, hints[key])
        return cls(source=source, **values)

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
                f"got {section!r}; pass '{{\"{CONFIG_KEY}\": {{\"key\": value}}}}'."
            )
        return cls.from_mapping(section)


def _check_type(where: str, key: str, value: Any, hint: Any) -> None:
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _union_type()) else (hint,)
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
        raise HeadKVConfigError(f"{where}: setting '{key}' must be {names}, got {value!r}. Fix its value.")


def _union_type():
    import types

    return types.UnionType
