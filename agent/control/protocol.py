"""The control socket's wire format: one JSON object per line, versioned. Pure.

Request:  {"v": 1, "id": <string or integer, optional>, "op": "status|ping|renew|reload|reconnect"}
Response: {"v": 1, "id": <the request's id>, "ok": true, "result": {...}}
          {"v": 1, "id": ..., "ok": false, "error": {"code": "...", "message": "..."}}

A request is at most `MAX_REQUEST_BYTES` (newline included), UTF-8, nested at most `MAX_DEPTH`
deep (checked before the JSON parser sees it, so a hostile peer cannot make it recurse), with no
duplicate or unknown keys and no NaN or Infinity. Anything else is a `ProtocolError` whose
`code` is the error code sent back; the connection is then closed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agent.errors import AgentError

__all__ = [
    "ACTING",
    "MAX_REQUEST_BYTES",
    "OPS",
    "READ_ONLY",
    "VERSION",
    "ProtocolError",
    "Request",
    "error_response",
    "ok_response",
    "parse_request",
]

VERSION = 1
MAX_REQUEST_BYTES = 4096
MAX_DEPTH = 4
MAX_ID_CHARS = 128
#: requests anyone allowed to read may make
READ_ONLY = frozenset({"status", "ping"})
#: requests that make the service act: root and the service user only
ACTING = frozenset({"renew", "reload", "reconnect"})
OPS = READ_ONLY | ACTING
_KEYS = frozenset({"v", "id", "op"})

# error codes (stable strings, for tools)
BAD_REQUEST = "bad_request"
TOO_LARGE = "too_large"
UNSUPPORTED_VERSION = "unsupported_version"
UNKNOWN_OP = "unknown_op"
FORBIDDEN = "forbidden"
BUSY = "busy"
TIMEOUT = "timeout"
ATTEMPT_FAILED = "attempt_failed"
UNAVAILABLE = "unavailable"
INTERNAL = "internal"

RequestId = str | int | None


class ProtocolError(AgentError):
    """A request the server cannot take; `code` goes back to the peer."""

    def __init__(self, code: str, message: str, *, request_id: RequestId = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


@dataclass(frozen=True)
class Request:
    op: str
    id: RequestId = None
    v: int = VERSION


def _depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects, strings skipped."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_request(line: bytes) -> Request:
    """One request line (with or without its newline) -> Request, or ProtocolError."""
    if len(line) > MAX_REQUEST_BYTES:
        raise ProtocolError(TOO_LARGE, f"request longer than {MAX_REQUEST_BYTES} bytes")
    line = line.removesuffix(b"\n").removesuffix(b"\r")
    if _depth(line) > MAX_DEPTH:
        raise ProtocolError(BAD_REQUEST, f"request nested deeper than {MAX_DEPTH}")
    try:
        text = line.decode("utf-8")
        table = json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise ProtocolError(BAD_REQUEST, f"request is not UTF-8 (byte {e.start})") from e
    except (ValueError, RecursionError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ProtocolError(BAD_REQUEST, f"request is not a JSON object: {reason}") from e
    if not isinstance(table, dict):
        raise ProtocolError(BAD_REQUEST, "request is not a JSON object")
    request_id = table.get("id")
    if request_id is not None and not (
        _is_int(request_id) or (isinstance(request_id, str) and len(request_id) <= MAX_ID_CHARS)
    ):
        raise ProtocolError(
            BAD_REQUEST, f"id: expected a string of at most {MAX_ID_CHARS} characters or an integer"
        )
    if isinstance(request_id, int) and not -(2**53) <= request_id <= 2**53:
        raise ProtocolError(BAD_REQUEST, "id: integer out of range")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        shown = ", ".join(repr(k)[:40] for k in unknown[:3])
        raise ProtocolError(BAD_REQUEST, f"unknown keys: {shown}", request_id=request_id)
    version = table.get("v")
    if not _is_int(version):
        raise ProtocolError(BAD_REQUEST, "v: expected the integer 1", request_id=request_id)
    if version != VERSION:
        raise ProtocolError(
            UNSUPPORTED_VERSION,
            f"protocol version {version} is not supported (this service speaks {VERSION})",
            request_id=request_id,
        )
    op = table.get("op")
    if not isinstance(op, str):
        raise ProtocolError(BAD_REQUEST, "op: expected a string", request_id=request_id)
    if op not in OPS:
        raise ProtocolError(
            UNKNOWN_OP,
            f"unknown op {op[:40]!r}; expected one of {', '.join(sorted(OPS))}",
            request_id=request_id,
        )
    return Request(op=op, id=request_id, v=version)


def _line(table: dict[str, Any]) -> bytes:
    return json.dumps(table, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def ok_response(request_id: RequestId, result: dict[str, Any]) -> bytes:
    return _line({"v": VERSION, "id": request_id, "ok": True, "result": result})


def error_response(
    request_id: RequestId, code: str, message: str, **extra: str | int | None
) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message, **extra}
    return _line({"v": VERSION, "id": request_id, "ok": False, "error": error})
