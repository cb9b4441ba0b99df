"""Reading a training config: YAML mappings into the frozen dataclasses of config.py.

`build` is `cls(**raw)` with the checks a hand-written file needs: unknown keys are errors that
name the key and list the valid ones, values are type-checked against the dataclass hints
(YAML 1.1 reads `1e-5` as a string; it is accepted as the number it spells), nested sections
become nested dataclasses. Range and consistency checks stay in each dataclass's __post_init__.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

from ..errors import FastDLLMError
from .config import TrainConfig


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise FastDLLMError(f"{key} must be a mapping of keys, got {value!r}", field=key)
        return build(hint, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise FastDLLMError(f"{key} must be a list of {len(args)} values, got {value!r}", field=key)
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise FastDLLMError(f"{key} must be true or false, got {value!r}", field=key)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise FastDLLMError(f"{key} must be an integer, got {value!r}", field=key)
        return int(value)
    if hint is float:
        # YAML 1.1 reads `1e-5` (no dot) as a string; accept it as the number it spells
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or not math.isfinite(number):
            raise FastDLLMError(f"{key} must be a number, got {value!r}", field=key)
        return number
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise FastDLLMError(f"{key} must be a string, got {value!r}", field=key)
        return value
    raise TypeError(f"unhandled config type {hint!r}")  # a bug here, not a user error


def build(cls, raw: dict[str, Any], section: str = ""):
    """`cls(**raw)` with unknown keys rejected (naming the valid ones) and values type-checked."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{section}." if section else ""
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"section {section!r}" if section else "the top level"
        raise FastDLLMError(
            f"unknown config key {prefix}{unknown[0]} in {where}; valid keys: {', '.join(fields)}",
            field=f"{prefix}{unknown[0]}")
    missing = [n for n, f in fields.items() if n not in raw
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise FastDLLMError(f"missing required config key {prefix}{missing[0]}", field=f"{prefix}{missing[0]}")
    kwargs = {name: _convert(value, hints[name], f"{prefix}{name}") for name, value in raw.items()}
    return cls(**kwargs)


def load_train_config(path: str | Path) -> TrainConfig:
    """Read a YAML training config. Relative paths inside it stay relative to the working
    directory (as on the command line), not to the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FastDLLMError(f"training config {str(path)!r} does not exist; pass a YAML file "
                            "(see configs/adapt_example.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise FastDLLMError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise FastDLLMError(f"{path} must hold a mapping of config keys at the top level")
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    return build(TrainConfig, raw)
