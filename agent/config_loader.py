"""The config loader: a TOML table -> a tree of frozen dataclasses, by walking their fields.

Pure and generic: it knows no key of ours. The schema (`agent/config.py`) declares each field's
type and, through `checked(...)`, a check that returns what was expected or None; the loader
converts each value to the field's type, runs the checks and raises one `ConfigError` line that
names the file, the key path and what was expected. Reading the file is `agent/config_file.py`.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import ConfigError

__all__ = ["Check", "Loader", "checked"]

Check = Callable[[Any], "str | None"]


def checked(
    default: Any = dataclasses.MISSING,
    *,
    check: Check | None = None,
    item_check: Check | None = None,
    **kw: Any,
) -> Any:
    """A dataclass field with a validity check (returns what was expected, or None).

    `item_check` checks each item of a list value (the error names the item: `key[2]`).
    """
    metadata = {"check": check, "item_check": item_check}
    if isinstance(default, (list, tuple)):
        value = tuple(default)
        return field(default_factory=lambda: value, metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        item = _type_name(typing.get_args(tp)[0]).removeprefix("a ").removeprefix("an ")
        return f"a list of {item}s"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        Path: "a path string",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _show(value: Any) -> str:
    """A value as the error shows it: short, and never more than one line (repr escapes)."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return f"a TOML date/time ({value.isoformat()})"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**60:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_INT64 = (-(2**63), 2**63 - 1)


def _key(name: str) -> str:
    """A TOML key as written in the file: bare, or quoted (escaped, so always one line)."""
    if _BARE_KEY.fullmatch(name):
        return name
    return '"' + name.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


class Loader:
    """Builds a frozen dataclass tree from a TOML table; each error names file and key."""

    def __init__(self, source: Path) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {message}")

    def expected(self, key: str, what: str, value: Any) -> ConfigError:
        return self.fail(key, f"expected {what}, got {_show(value)}")

    def convert(self, key: str, tp: Any, value: Any) -> Any:
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            # TOML has no null: "" means "not set" for optional values
            if value == "":
                return None
            return self.convert(key, args[0], value)
        if origin is tuple:
            if not isinstance(value, list):
                raise self.expected(key, _type_name(tp), value)
            (item_tp, _ellipsis) = typing.get_args(tp)
            return tuple(self.convert(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value))
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise self.expected(key, "a table", value)
            return self.build(tp, value, prefix=f"{key}.")
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            for member in tp:
                if value == member.value:
                    return member
            hint = ""
            if isinstance(value, str):
                folded = [m.value for m in tp if str(m.value).lower() == value.strip().lower()]
                hint = (
                    f" (values are case-sensitive: did you mean {folded[0]!r}?)" if folded else ""
                )
            raise self.fail(key, f"expected {_type_name(tp)}, got {_show(value)}{hint}")
        if tp is bool:
            if not isinstance(value, bool):
                raise self.expected(key, "true or false", value)
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.expected(key, "an integer", value)
            if not _INT64[0] <= value <= _INT64[1]:
                raise self.expected(key, "an integer that fits in 64 bits (TOML's range)", value)
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.expected(key, "a number", value)
            if isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
                raise self.expected(key, "a number that fits in 64 bits (TOML's range)", value)
            if not math.isfinite(value):
                raise self.expected(key, "a finite number", value)
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise self.expected(key, "a string", value)
            if _CONTROL.search(value):
                raise self.expected(key, "a string without control characters", value)
            return value
        if tp is Path:
            if not isinstance(value, str) or not value:
                raise self.expected(key, "a path string", value)
            if _CONTROL.search(value):
                raise self.expected(key, "a path without control characters", value)
            if not value.startswith("/"):
                raise self.expected(key, "an absolute path", value)
            return Path(value)
        raise TypeError(f"config schema uses an unsupported type at {key}: {tp!r}")

    def build(self, cls: type[T], table: dict[str, Any], *, prefix: str = "") -> T:
        hints = typing.get_type_hints(cls)
        fields = {
            f.name: f
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if not f.metadata.get("internal")
        }
        for name in table:
            if name not in fields:
                import difflib  # only for a message

                close = difflib.get_close_matches(name, list(fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.fail(f"{prefix}{_key(name)}", f"unknown key{hint}")
        values: dict[str, Any] = {}
        for name, f in fields.items():
            key = f"{prefix}{name}"
            if name in table:
                value = self.convert(key, hints[name], table[name])
            elif isinstance(hints[name], type) and dataclasses.is_dataclass(hints[name]):
                if f.default_factory is not dataclasses.MISSING:
                    continue
                value = self.build(hints[name], {}, prefix=f"{key}.")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise self.fail(key, f"missing required key ({_type_name(hints[name])})")
            else:
                continue
            check = f.metadata.get("check")
            if check is not None and value is not None:
                problem = check(value)
                if problem:
                    raise self.expected(key, problem, table.get(name, value))
            item_check = f.metadata.get("item_check")
            if item_check is not None and value is not None:
                for i, item in enumerate(value):
                    problem = item_check(item)
                    if problem:
                        raise self.expected(f"{key}[{i}]", problem, item)
            values[name] = value
        return cls(**values)
