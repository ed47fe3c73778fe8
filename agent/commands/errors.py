"""Why a command was refused: one exception, a stable machine code, a one-line message (pure).

The codes are part of the channel's contract (`docs/commands.md`): backends match on them, so a
code is never renamed, only added. `security` marks the codes that mean someone tried to make
the device do what its operator did not sign (record them as security events; never retry).
"""

from __future__ import annotations

from hal.errors import AgentError

#: code -> what it means (the table in docs/commands.md)
CODES: dict[str, str] = {
    "oversized": "the message is larger than the limit (checked before parsing)",
    "malformed": "not a well-formed envelope or payload (JSON, fields, types, base64, DER)",
    "unsigned": "no signature, and unsigned commands are not allowed",
    "bad_signature": "the signature does not verify over the payload with the signer's key",
    "untrusted_signer": "the signer's certificate does not chain to a command trust anchor, "
    "lacks the command-signing EKU or digitalSignature, or was not valid",
    "wrong_device": "the command names another device",
    "lifetime_too_long": "expires_at - issued_at is above the maximum lifetime",
    "not_yet_valid": "issued_at is in the future (beyond the allowed clock skew)",
    "expired": "expires_at has passed",
    "unknown_command": "the command is not one this agent knows",
    "bad_args": "the command's args are not what it takes",
    "replayed": "a command with this id was already accepted",
    "busy": "the replay memory is full of unexpired ids: no new command until some expire",
    "state_damaged": "the replay memory file is damaged: every command is refused until an "
    "operator repairs it",
    "state_unavailable": "the replay memory could not be read or written: the command was "
    "not accepted",
}

SECURITY_CODES = frozenset(
    {"unsigned", "bad_signature", "untrusted_signer", "wrong_device", "replayed"}
)


class CommandRefused(AgentError):
    """A command was refused. `code` is one of `CODES`; `command_id` is the id when one could
    be read (before the signature was checked it is only what the sender claimed)."""

    def __init__(self, code: str, message: str, *, command_id: str | None = None) -> None:
        if code not in CODES:
            raise ValueError(f"unknown refusal code {code!r}")
        line = " ".join(message.split())
        super().__init__(f"command {command_id} refused ({code}): {line}" if command_id
                         else f"command refused ({code}): {line}")  # fmt: skip
        self.code = code
        self.detail = line
        self.command_id = command_id

    @property
    def security(self) -> bool:
        """Someone tried to make the device do what its operator did not sign."""
        return self.code in SECURITY_CODES

    def with_id(self, command_id: str | None) -> CommandRefused:
        """The same refusal naming `command_id` (when it had none), cause kept."""
        if command_id is None or self.command_id is not None:
            return self
        named = CommandRefused(self.code, self.detail, command_id=command_id)
        named.__cause__ = self.__cause__
        return named
