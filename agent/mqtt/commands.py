"""The seam between the channel and the signed-command verifier (pure).

A verifier takes the raw bytes off `<prefix>/<device>/commands` and `now` and returns either an
accepted command (id, name, args) or a refusal with a stable code. The channel carries out what
is accepted and answers both on `.../commands/response`; it never parses a command itself.
Until a verifier is configured, `refuse_all` refuses every command with `not_configured`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["ACTIONS", "Accepted", "CommandVerifier", "Refused", "refuse_all"]

#: what the channel knows how to do
ACTIONS = ("renew", "status", "refresh-cacerts", "ping")


@dataclass(frozen=True)
class Accepted:
    id: str
    command: str
    args: Mapping[str, Any] = field(default_factory=dict)
    #: accepted without a signature (mqtt.insecure_unsigned_commands)
    unsigned: bool = False


@dataclass(frozen=True)
class Refused:
    code: str
    message: str
    id: str | None = None
    #: a refusal that may be an attack (bad signature, untrusted signer, replay ...)
    security: bool = False


CommandVerifier = Callable[[bytes, datetime], "Accepted | Refused"]


def refuse_all(raw: bytes, now: datetime) -> Accepted | Refused:
    return Refused(
        "not_configured",
        "commands are not accepted: no command verifier is configured (mqtt.command_trust_anchor)",
    )
