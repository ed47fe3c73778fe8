"""Signed commands for the device channel (pure; docs/commands.md).

The channel hands each message of `<prefix>/<device>/commands` to `verify_command` with the
device id, the command trust anchors, `now` and a `ReplayMemory`; it gets a `Command` to carry
out or a `CommandRefused` (a stable `code`, a one-line message) to answer with
`refused_response` and report with `refused_event`.
"""

from agent.commands.envelope import (
    COMMANDS,
    Command,
    CommandLimits,
    ReplayGuard,
    verify_command,
)
from agent.commands.errors import CODES, SECURITY_CODES, CommandRefused
from agent.commands.replay import ReplayMemory, ReplayStateDamaged
from agent.commands.response import (
    accepted_event,
    accepted_response,
    refused_event,
    refused_response,
    response,
)
from agent.commands.signer import COMMAND_SIGNING, Signer, parse_anchors

__all__ = [
    "CODES",
    "COMMANDS",
    "COMMAND_SIGNING",
    "SECURITY_CODES",
    "Command",
    "CommandLimits",
    "CommandRefused",
    "ReplayGuard",
    "ReplayMemory",
    "ReplayStateDamaged",
    "Signer",
    "accepted_event",
    "accepted_response",
    "parse_anchors",
    "refused_event",
    "refused_response",
    "response",
    "verify_command",
]
