"""What the device says back about a command (pure): the JSON for
`<prefix>/<device>/commands/response`, and the event dicts for "command refused" and
"command accepted" (docs/commands.md).

    {"v":1,"id":"...","ok":false,"code":"expired","detail":"...","at":"2026-12-01T12:00:00Z"}

`id` is null when none could be read; for a refusal before the signature was checked it is the
id the sender claimed. `detail` is one line of at most MAX_DETAIL_CHARS characters. Nothing
secret is ever in a command or a refusal, so both may be published as they are.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from agent.commands.envelope import ID, Command
from agent.commands.errors import CommandRefused

RESPONSE_VERSION = 1
MAX_DETAIL_CHARS = 300
#: `code` of a response with ok=true: the command was verified and is being carried out
ACCEPTED = "accepted"
_TIME = "%Y-%m-%dT%H:%M:%SZ"


def _at(at: datetime) -> str:
    return at.astimezone(timezone.utc).strftime(_TIME)


def _detail(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_DETAIL_CHARS else line[: MAX_DETAIL_CHARS - 3] + "..."


def _id(command_id: str | None) -> str | None:
    return command_id if command_id is not None and ID.match(command_id) else None


def response(command_id: str | None, *, ok: bool, code: str, detail: str, at: datetime) -> bytes:
    """The response payload (compact JSON, UTF-8)."""
    table = {
        "v": RESPONSE_VERSION,
        "id": _id(command_id),
        "ok": ok,
        "code": code,
        "detail": _detail(detail),
        "at": _at(at),
    }
    return json.dumps(table, separators=(",", ":")).encode()


def refused_response(error: CommandRefused, *, at: datetime) -> bytes:
    return response(error.command_id, ok=False, code=error.code, detail=error.detail, at=at)


def accepted_response(command: Command, *, at: datetime, detail: str = "") -> bytes:
    return response(
        command.id, ok=True, code=ACCEPTED, detail=detail or f"{command.command} accepted", at=at
    )


def refused_event(error: CommandRefused, *, at: datetime) -> dict[str, Any]:
    """For the events topic and the audit trail: `security` says someone tried to make the
    device do what its operator did not sign."""
    return {
        "event": "command_refused",
        "id": _id(error.command_id),
        "code": error.code,
        "security": error.security,
        "detail": _detail(error.detail),
        "at": _at(at),
    }


def accepted_event(command: Command, *, at: datetime) -> dict[str, Any]:
    signer = command.signer
    return {
        "event": "command_accepted",
        "id": command.id,
        "command": command.command,
        "signed": signer is not None,
        "signer": None if signer is None else signer.subject,
        "signer_serial": None if signer is None else signer.serial,
        "issued_at": _at(command.issued_at),
        "expires_at": _at(command.expires_at),
        "at": _at(at),
    }
