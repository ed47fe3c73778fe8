"""The signed command envelope: from the bytes off the topic to a verified `Command`, or one
`CommandRefused` with a stable code (pure; the format is docs/commands.md).

    {"v":1,"alg":"ES256","payload":"<base64>","sig":"<base64>","chain":["<base64 DER>",...]}

`payload` is the base64 of the exact bytes the signature covers: a JSON object

    {"v":1,"id":"...","device":"...","command":"renew|status|refresh-cacerts|ping",
     "args":{},"issued_at":"2026-12-01T12:00:00Z","expires_at":"2026-12-01T12:05:00Z"}

The signature is checked over those bytes as they arrived: nothing is re-encoded, so there is
no canonical form to get wrong. The order of the checks is part of the design:

1. size, before any parsing (`oversized`);
2. the envelope, with bounded JSON (depth, number spellings, duplicate keys: agent.bounded_json)
   and strict base64 (`malformed`); no signature: `unsigned`, unless the caller passed
   `insecure_unsigned=True`, which logs a warning every time;
3. the signature over the payload bytes, then the signer's certificate chain
   (`bad_signature`, `untrusted_signer`): until both pass, the payload is read only to report
   the id the sender claims;
4. the payload: its fields (`malformed`), the signer valid at issued_at, the device
   (`wrong_device`), the lifetime (`lifetime_too_long`), the time (`not_yet_valid`,
   `expired`), the command and its args (`unknown_command`, `bad_args`);
5. last, the replay memory (`replayed`, `busy`, `state_*`), which remembers the id before the
   command is returned, so a command runs at most once even if the agent dies while running it.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from cryptography import x509

from agent import bounded_json
from agent.commands.errors import CommandRefused
from agent.commands.signer import ALGORITHMS, Signer, check_signature, check_valid_at
from agent.commands.signer import validate_signer as _validate_signer

log = logging.getLogger(__name__)

ENVELOPE_VERSION = 1
PAYLOAD_VERSION = 1
#: command -> the args it takes (none yet: `args` must be {})
COMMANDS: dict[str, frozenset[str]] = {
    "renew": frozenset(),
    "status": frozenset(),
    "refresh-cacerts": frozenset(),
    "ping": frozenset(),
}
SIGNED_KEYS = frozenset({"v", "alg", "payload", "sig", "chain"})
UNSIGNED_KEYS = frozenset({"v", "payload"})
PAYLOAD_KEYS = frozenset({"v", "id", "device", "command", "args", "issued_at", "expires_at"})
#: an id: what UUIDs, ULIDs and most backends' ids look like; nothing a log or topic trips on
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")
MAX_DEVICE_CHARS = 128
_PRINTABLE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?\Z")
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z\Z")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
#: the envelope is an object holding an array (chain); the payload an object holding one (args)
MAX_DEPTH = 2


@dataclass(frozen=True)
class CommandLimits:
    """Bounds on what comes in over the channel (bytes, counts, durations)."""

    max_envelope_bytes: int = 16 * 1024
    max_payload_bytes: int = 4 * 1024
    max_chain_certs: int = 4
    max_cert_bytes: int = 4 * 1024
    #: the longest expires_at - issued_at accepted; it also bounds how long ids are remembered
    max_lifetime: timedelta = timedelta(hours=1)
    #: clock difference tolerated between the operator's backend and the device
    clock_skew: timedelta = timedelta(minutes=5)


@dataclass(frozen=True)
class Command:
    """A verified command: signed by a command signer (or, only with `insecure_unsigned`, not),
    for this device, within its lifetime, never seen before (its id is now remembered)."""

    id: str
    device: str
    command: str
    args: dict[str, Any] = field(hash=False)
    issued_at: datetime
    expires_at: datetime
    #: None: accepted without a signature because the caller passed insecure_unsigned=True
    signer: Signer | None
    #: the exact bytes the signature covers
    payload: bytes = field(repr=False)

    @property
    def unsigned(self) -> bool:
        return self.signer is None


class ReplayGuard(Protocol):
    """The replay memory as verify_command uses it (agent.commands.replay.ReplayMemory)."""

    def admit(
        self, command_id: str, *, expires_at: datetime, now: datetime, skew: timedelta
    ) -> None:
        """Remember `command_id` until `expires_at` (durably, before returning), or raise
        CommandRefused (`replayed`, `busy`, `expired`, `state_damaged`, `state_unavailable`)."""
        ...


@dataclass(frozen=True)
class _Envelope:
    payload: bytes
    alg: str | None = None
    sig: bytes | None = None
    chain: tuple[bytes, ...] = ()


def _malformed(message: str) -> CommandRefused:
    return CommandRefused("malformed", message)


def _show(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _keys(table: dict[str, Any]) -> str:
    keys = sorted(table)
    shown = ", ".join(_show(k, 24) for k in keys[:10])
    return f"[{shown}{', ...' if len(keys) > 10 else ''}]"


def _version(table: dict[str, Any], what: str, want: int) -> None:
    v = table.get("v")
    if type(v) is not int:  # a bool or a float is not a version
        raise _malformed(f"{what} has no integer version field v")
    if v != want:
        raise _malformed(f"{what} version {v} is not supported (this agent reads {want})")


def _base64(value: object, what: str, max_bytes: int) -> bytes:
    if not isinstance(value, str):
        raise _malformed(f"{what} is not a base64 string")
    if len(value) > 4 * (max_bytes // 3 + 1):
        raise _malformed(f"{what} is longer than {max_bytes} bytes")
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as e:
        raise _malformed(f"{what} is not base64 ({e})") from e
    if base64.b64encode(data).decode("ascii") != value:
        raise _malformed(f"{what} is not canonical base64 (standard alphabet, padded)")
    if not data or len(data) > max_bytes:
        raise _malformed(f"{what} must be 1 to {max_bytes} bytes, not {len(data)}")
    return data


def _parse_envelope(raw: bytes, limits: CommandLimits) -> _Envelope:
    try:
        table = bounded_json.loads(raw, max_depth=MAX_DEPTH)
    except ValueError as e:
        raise _malformed(f"the envelope is not JSON: {e}") from e
    if not isinstance(table, dict):
        raise _malformed("the envelope is not a JSON object")
    _version(table, "the envelope", ENVELOPE_VERSION)
    keys = set(table)
    if keys not in (SIGNED_KEYS, UNSIGNED_KEYS):
        raise _malformed(
            f"the envelope has keys {_keys(table)}; a signed one has {sorted(SIGNED_KEYS)}"
        )
    payload = _base64(table["payload"], "payload", limits.max_payload_bytes)
    if keys == UNSIGNED_KEYS:
        return _Envelope(payload=payload)
    alg = table["alg"]
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        raise _malformed(f"alg {_show(alg)} is not one of {', '.join(ALGORITHMS)}")
    sig = _base64(table["sig"], "sig", 1024)
    chain = table["chain"]
    if not isinstance(chain, list) or not 1 <= len(chain) <= limits.max_chain_certs:
        raise _malformed(f"chain must be a list of 1 to {limits.max_chain_certs} certificates")
    ders = tuple(_base64(c, f"chain[{i}]", limits.max_cert_bytes) for i, c in enumerate(chain))
    return _Envelope(payload=payload, alg=alg, sig=sig, chain=ders)


def _claimed_id(payload: bytes) -> str | None:
    """The id the payload claims, for the refusal message only (not yet verified)."""
    try:
        table = bounded_json.loads(payload, max_depth=MAX_DEPTH)
    except ValueError:
        return None
    value = table.get("id") if isinstance(table, dict) else None
    return value if isinstance(value, str) and ID.match(value) else None


#: what cryptography raises on first access to a malformed part (it parses lazily)
_MALFORMED = (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


def _certificates(chain: Sequence[bytes]) -> list[x509.Certificate]:
    certs = []
    for i, der in enumerate(chain):
        try:
            cert = x509.load_der_x509_certificate(der)
            # parsed lazily: touch what the path walker reads, so a malformed part is refused
            # here, naming the certificate, and not deep inside the walk
            _ = (cert.subject, cert.issuer, list(cert.extensions), cert.serial_number)
            _ = (cert.not_valid_before_utc, cert.not_valid_after_utc)
        except _MALFORMED as e:
            raise _malformed(f"chain[{i}] is not a well-formed DER certificate: {e}") from e
        certs.append(cert)
    return certs


def _text(table: dict[str, Any], key: str, limit: int) -> str:
    value = table[key]
    if not isinstance(value, str) or len(value) > limit or not _PRINTABLE.match(value):
        raise _malformed(f"payload {key} must be 1 to {limit} printable ASCII characters")
    return value


def _time(table: dict[str, Any], key: str) -> datetime:
    value = table[key]
    if not isinstance(value, str) or not _TIME.match(value):
        raise _malformed(f"payload {key} must be a UTC time exactly like 2026-01-31T12:00:00Z")
    try:
        return datetime.strptime(value, TIME_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError as e:
        raise _malformed(f"payload {key} {value} is not a valid time") from e


@dataclass(frozen=True)
class _Payload:
    id: str
    device: str
    command: str
    args: dict[str, Any]
    issued_at: datetime
    expires_at: datetime


def _parse_payload(data: bytes) -> _Payload:
    try:
        table = bounded_json.loads(data, max_depth=MAX_DEPTH)
    except ValueError as e:
        raise _malformed(f"the payload is not JSON: {e}") from e
    if not isinstance(table, dict):
        raise _malformed("the payload is not a JSON object")
    _version(table, "the payload", PAYLOAD_VERSION)
    if set(table) != PAYLOAD_KEYS:
        raise _malformed(f"the payload has keys {_keys(table)}; want {sorted(PAYLOAD_KEYS)}")
    command_id = table["id"]
    if not isinstance(command_id, str) or not ID.match(command_id):
        raise _malformed(
            "payload id must be 1 to 64 of A-Z a-z 0-9 . _ : - (not starting with one of .:_-)"
        )
    args = table["args"]
    if not isinstance(args, dict):
        raise _malformed("payload args must be a JSON object")
    return _Payload(
        id=command_id,
        device=_text(table, "device", MAX_DEVICE_CHARS),
        command=_text(table, "command", 64),
        args=args,
        issued_at=_time(table, "issued_at"),
        expires_at=_time(table, "expires_at"),
    )


def _check_claims(p: _Payload, *, device_id: str, now: datetime, limits: CommandLimits) -> None:
    if p.device != device_id:
        raise CommandRefused(
            "wrong_device", f"the command is for device {p.device!r}, this is {device_id!r}"
        )
    lifetime = p.expires_at - p.issued_at
    if lifetime <= timedelta(0):
        raise _malformed("payload expires_at is not after issued_at")
    if lifetime > limits.max_lifetime:
        raise CommandRefused(
            "lifetime_too_long",
            f"expires_at - issued_at is {lifetime.total_seconds():.0f} s, more than the "
            f"maximum of {limits.max_lifetime.total_seconds():.0f} s",
        )
    if p.issued_at > now + limits.clock_skew:
        raise CommandRefused(
            "not_yet_valid",
            f"issued_at {p.issued_at:{TIME_FORMAT}} is in the future (now {now:{TIME_FORMAT}},"
            f" clock skew allowed {limits.clock_skew.total_seconds():.0f} s)",
        )
    if now - limits.clock_skew >= p.expires_at:
        raise CommandRefused(
            "expired",
            f"expired at {p.expires_at:{TIME_FORMAT}} (now {now:{TIME_FORMAT}}, clock skew "
            f"allowed {limits.clock_skew.total_seconds():.0f} s)",
        )
    if p.command not in COMMANDS:
        raise CommandRefused(
            "unknown_command",
            f"{p.command!r} is not a command this agent knows ({', '.join(COMMANDS)})",
        )
    unexpected = sorted(set(p.args) - COMMANDS[p.command])
    if unexpected:
        takes = sorted(COMMANDS[p.command])
        raise CommandRefused(
            "bad_args",
            f"{p.command} takes {'args ' + ', '.join(takes) if takes else 'no args'}; got "
            f"{', '.join(_show(k, 24) for k in unexpected[:5])}",
        )


def verify_command(
    raw: bytes,
    *,
    device_id: str,
    anchors: Sequence[x509.Certificate],
    now: datetime,
    replay: ReplayGuard,
    limits: CommandLimits = CommandLimits(),
    insecure_unsigned: bool = False,
) -> Command:
    """The verified command in `raw` (the bytes of one message on the commands topic), its id
    now remembered in `replay`; or CommandRefused with the code and a one-line reason.

    `anchors`: the command trust anchors (mqtt.command_trust_anchor). `insecure_unsigned`: accept
    an envelope without a signature (labs only; a warning is logged for each one). A signed
    envelope is always checked in full, whatever `insecure_unsigned` says."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if len(raw) > limits.max_envelope_bytes:
        raise CommandRefused(
            "oversized", f"{len(raw)} bytes is more than the limit of {limits.max_envelope_bytes}"
        )
    envelope = _parse_envelope(raw, limits)
    claimed = _claimed_id(envelope.payload)
    try:
        return _verify(
            envelope,
            device_id=device_id,
            anchors=anchors,
            now=now,
            replay=replay,
            limits=limits,
            insecure_unsigned=insecure_unsigned,
        )
    except CommandRefused as e:
        named = e.with_id(claimed)
        if named is e:
            raise
        raise named from e.__cause__


def _verify(
    envelope: _Envelope,
    *,
    device_id: str,
    anchors: Sequence[x509.Certificate],
    now: datetime,
    replay: ReplayGuard,
    limits: CommandLimits,
    insecure_unsigned: bool,
) -> Command:
    signer: Signer | None = None
    if envelope.sig is None:
        if not insecure_unsigned:
            raise CommandRefused(
                "unsigned",
                "the envelope carries no signature; unsigned commands are refused "
                "(mqtt.insecure_unsigned_commands is off)",
            )
    else:
        assert envelope.alg is not None
        certs = _certificates(envelope.chain)
        check_signature(certs[0], envelope.alg, envelope.sig, envelope.payload)
        try:
            signer = _validate_signer(certs, anchors=anchors, now=now, skew=limits.clock_skew)
        except _MALFORMED as e:  # a part of these untrusted certificates nothing touched yet
            raise CommandRefused(
                "untrusted_signer", f"malformed certificate in the signer chain: {e}"
            ) from e
    payload = _parse_payload(envelope.payload)
    if signer is not None:
        check_valid_at(signer, payload.issued_at, limits.clock_skew)
    _check_claims(payload, device_id=device_id, now=now, limits=limits)
    if signer is None:
        log.warning(
            "INSECURE: accepting unsigned command %s (%s) because insecure_unsigned is set: "
            "anyone who can publish to the commands topic controls this device",
            payload.id,
            payload.command,
        )
    replay.admit(payload.id, expires_at=payload.expires_at, now=now, skew=limits.clock_skew)
    return Command(
        id=payload.id,
        device=payload.device,
        command=payload.command,
        args=payload.args,
        issued_at=payload.issued_at,
        expires_at=payload.expires_at,
        signer=signer,
        payload=envelope.payload,
    )
