"""The channel's payloads: versioned JSON (pure; the formats are in docs/mqtt.md).

Every message carries `schema_version` (a consumer refuses a major version it does not know) and
`kind`. Times are RFC 3339 UTC with a `Z`. A message bigger than `mqtt.max_payload_bytes` is not
sent: an event is cut to its kind and a note, a status to its core.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from agent.components import Event

__all__ = [
    "SCHEMA_VERSION",
    "encode",
    "event_message",
    "offline_status",
    "online_status",
    "response_message",
]

SCHEMA_VERSION = 1


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _default(value: object) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)  # a Path, an enum: their text


def encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, default=_default, separators=(",", ":"), sort_keys=True).encode()


def online_status(
    device: str, now: datetime, document: Mapping[str, Any], channel: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "status",
        "device": device,
        "online": True,
        "at": iso(now),
        "status": dict(document),
        "channel": dict(channel),
    }


def offline_status(device: str, now: datetime, reason: str) -> dict[str, Any]:
    """The retained offline status: the last will (`reason` "connection lost", `at` the time of
    the connection it belongs to) or the one sent at a clean stop ("stopped")."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "status",
        "device": device,
        "online": False,
        "at": iso(now),
        "reason": reason,
    }


def event_message(device: str, seq: int, event: Event, dropped_before: int) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "event",
        "device": device,
        "seq": seq,
        "event": event.kind,
        "at": iso(event.at),
        "source": event.source or "daemon",
        "detail": dict(event.detail),
        "dropped_before": dropped_before,
    }


def response_message(
    now: datetime, *, command_id: str | None, ok: bool, code: str, detail: str = ""
) -> dict[str, Any]:
    """On `.../commands/response`, as docs/commands.md gives it (`v`, not `schema_version`):
    an accepted command is answered `ok: true, code: "accepted"` at once; `renew` gets a second
    answer when its attempt finished (`code` "renewed" or the failure's disposition)."""
    return {
        "v": 1,
        "id": command_id,
        "ok": ok,
        "code": code,
        "detail": " ".join(detail.split())[:300],
        "at": iso(now),
    }


def bounded(message: dict[str, Any], limit: int) -> bytes:
    """`message` encoded, or, when it is over `limit`, the same without its large parts."""
    data = encode(message)
    if len(data) <= limit:
        return data
    slim = {k: v for k, v in message.items() if k not in ("status", "detail", "result")}
    slim["truncated"] = f"{len(data)} bytes is over mqtt.max_payload_bytes ({limit})"
    return encode(slim)
