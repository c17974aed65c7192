"""One validation pattern for lorakit's typed configs (LoraConfig, DataConfig, TrainConfig and its sections).

A config is a dataclass with `problems(prefix) -> list[str]`: every invalid value, each message starting with the key
as the user writes it (`prefix` + the field name: "optim.lr" inside a TrainConfig). Its `__post_init__` calls
`check`, so constructing a config raises one LorakitError that lists every problem, nested sections included.

`build(cls, data)` makes a config from nested dicts (a YAML file, overrides, a saved config): unknown keys and bad
values anywhere in the tree are reported together in that one error. While it runs, the sections it constructs leave
their checks to it, and it checks the finished tree once.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import re
from typing import Any, TypeVar

from lorakit.errors import LorakitError

C = TypeVar("C")

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
"""An adapter's name as the server, the UI and generation accept it: a plain folder name (no path, no leading dot)."""

_BUILDING = contextvars.ContextVar("lorakit_building_config", default=False)


def check(config: Any, title: str, hint: str = "") -> None:
    """Raise one LorakitError listing `config.problems()`; nothing when there are none, or while `build` runs."""
    if not _BUILDING.get():
        raise_problems(config.problems(), title, hint)


def raise_problems(problems: list[str], title: str, hint: str = "") -> None:
    if problems:
        raise LorakitError(f"{title}:\n  - " + "\n  - ".join(problems) + (f"\n{hint}" if hint else ""))


def build(cls: type[C], data: Any, title: str, hint: str = "") -> C:
    """`cls` from nested dicts; every unknown key and every bad value, at any depth, in one LorakitError."""
    problems: list[str] = []
    token = _BUILDING.set(True)
    try:
        config = _build(cls, data, "", problems)
    finally:
        _BUILDING.reset(token)
    raise_problems(problems + config.problems(), title, hint)
    return config


def _build(cls: type[C], data: Any, prefix: str, problems: list[str]) -> C:
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or cls.__name__} must be a mapping of keys to values, "
                        f"got {type(data).__name__}")
        data = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [str(k) for k in data if k not in fields]
    if unknown:
        problems.append(f"Unknown {cls.__name__} key(s) {[prefix + k for k in unknown]}; allowed"
                        f"{' in ' + prefix.rstrip('.') if prefix else ''}: {list(fields)}")
    values = {}
    for name, value in data.items():
        if name not in fields:
            continue
        section = fields[name].default_factory  # a nested config section (TrainConfig.optim ...)
        if dataclasses.is_dataclass(section):
            value = _build(section, {} if value is None else value, f"{prefix}{name}.", problems)
        elif isinstance(value, str) and "float" in str(fields[name].type) and float_like(value):
            value = float(value)  # YAML 1.1 reads "2e-4" as a string
        values[name] = value
    return cls(**values)


def float_like(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_int(v: Any) -> bool:
    """An int (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool)
