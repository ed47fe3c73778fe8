"""JSON from outside bytes with bounds the standard parser does not have (pure).

`json.loads` recurses once per nesting level (a 3000-deep array raises RecursionError, the
firmware finding of issue 13), turns a 4300-digit number into ValueError only by accident of the
interpreter's int limit, accepts `NaN` and `Infinity`, and keeps the last of duplicate keys
(another parser may keep the first: the classic way to make a signer and a verifier read
different documents). `too_deep` scans the bytes first (strings skipped), so nothing deeper than
the caller's limit ever reaches the recursive parser; `loads` adds the scan, refuses duplicate
keys and non-finite numbers, and bounds every number's spelling.
"""

from __future__ import annotations

import json
from typing import Any

#: digits (sign, fraction and exponent included) a number may be spelled with
MAX_NUMBER_CHARS = 32


def too_deep(data: bytes, max_depth: int) -> bool:
    """True if `data` opens more than `max_depth` nested arrays/objects anywhere (a byte scan
    that skips strings; run before any recursive parser sees the bytes)."""
    depth = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            if depth > max_depth:
                return True
        elif byte in b"]}":
            depth -= 1
    return False


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {duplicate[:40]!r}")
    return dict(pairs)


def _number(kind: type[int] | type[float], max_chars: int) -> Any:
    def parse(text: str) -> int | float:
        if len(text) > max_chars:
            raise ValueError(f"a number spelled with more than {max_chars} characters")
        return kind(text)

    return parse


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(data: bytes, *, max_depth: int, max_number_chars: int = MAX_NUMBER_CHARS) -> Any:
    """The JSON value in `data` (UTF-8), or ValueError naming what is wrong: nested deeper than
    `max_depth`, not UTF-8, not JSON, a duplicate key, NaN/Infinity, an over-long number."""
    if too_deep(data, max_depth):
        raise ValueError(f"nested deeper than {max_depth} levels")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 (byte {e.start})") from e
    try:
        return json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_int=_number(int, max_number_chars),
            parse_float=_number(float, max_number_chars),
            parse_constant=_constant,
        )
    except RecursionError as e:  # unreachable after the scan; kept so it can never escape
        raise ValueError("nested too deeply") from e
    except ValueError as e:
        raise ValueError(" ".join(str(e).split())) from e
