"""Fuzz targets: one per parser of outside bytes (issue 13).

Each target takes arbitrary bytes and drives one parser the way the agent does with bytes from
the network, a vendor or the disk. The contract every parser keeps: any input gives a value or
an `AgentError` subclass with a one-line message; any other exception (and a hang, or unbounded
memory, which the runner bounds) is a finding.

`check(target, data)` runs one input and enforces the contract; the atheris runner
(`tests/fuzz/run.py`), the corpus replay test (`tests/test_fuzz.py`) and the seed generator
(`tests/fuzz/make_corpus.py`) all go through it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509

from agent.commands import CommandLimits, CommandRefused, verify_command
from agent.commands import replay as command_replay
from agent.commands.response import refused_event, refused_response
from agent.errors import AgentError
from agent.est import csrattrs, response, wire
from agent.est.pending import PendingRequest
from agent.firmware import bundle
from agent.firmware import state as firmware_state
from agent.firmware.chain import TrustPolicy
from agent.firmware.manifest import parse_manifest
from agent.firmware.status import FirmwareStatus
from agent.firmware.verify import DeviceFacts, verify_header
from agent.pki import SubjectSpec
from agent.renewal_state import parse_state as parse_scheduler_state
from hal.bootloader.base import parse_lines
from hal.bootloader.grub import GrubScheme
from hal.bootloader.uboot import UBootScheme
from hal.interfaces import KeyAlgorithm

CORPUS = Path(__file__).parent / "corpus"
DATA = Path(__file__).parent / "data"
#: the time every target judges validity at (the seeds are valid then)
NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=timezone.utc)
SKEW = timedelta(minutes=5)
WHERE = Path("/fuzz/input")


class ContractViolation(AssertionError):
    """An AgentError whose message is not one line (the exception types are findings too)."""


def split_http(data: bytes) -> tuple[dict[str, str], bytes]:
    """A captured HTTP response as the seeds hold it: header lines, an empty line, the body.
    Header names are lower case, as the EST transport hands them to the parsers."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return {}, data
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return headers, body


def _retry_after(headers: dict[str, str]) -> None:
    seconds = wire.parse_retry_after(headers.get("retry-after"), NOW)
    wire.clamp_retry_after(seconds, minimum=1.0, maximum=86400.0, default=60.0)


def est_cacerts(data: bytes) -> None:
    """GET /cacerts: Content-Type, base64 or DER body, PKCS#7 certs-only, CA selection."""
    headers, body = split_http(data)
    _retry_after(headers)
    wire.check_media_type(headers, wire.PKCS7_TYPES, "/cacerts")
    certs = response.parse_certs_only(wire.decode_body(body, headers, "/cacerts"), "/cacerts")
    for cert in certs:
        response.fingerprint(cert)
    response.ca_roots(certs)
    valid = response.validate_ca_certs(certs, now=NOW, clock_skew=SKEW)
    response.select_bootstrap_anchor(valid, response.fingerprint(valid[0]))


def est_enroll(data: bytes) -> None:
    """POST /simpleenroll: the issued certificate picked and checked against the CA certs."""
    headers, body = split_http(data)
    _retry_after(headers)
    wire.check_media_type(headers, wire.PKCS7_TYPES, "/simpleenroll")
    der = wire.decode_body(body, headers, "/simpleenroll")
    certs = response.parse_certs_only(der, "/simpleenroll")
    # the key our CSR carried: in the fuzz harness, that of the first end-entity certificate
    # of the response (so the checks past the key match are reached); the agent's own key
    # never comes from the response, so failing to read it here is not the parser's business
    leaf = next((c for c in certs if not _is_ca(c)), certs[0])
    try:
        key = leaf.public_key()
    except Exception:
        return
    response.validate_issued(
        certs,
        requested_key=key,
        ca_certs=[c for c in certs if c is not leaf] or certs,
        now=NOW,
        clock_skew=SKEW,
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except Exception:
        return False


def est_csrattrs(data: bytes) -> None:
    """GET /csrattrs: the body decoded, CsrAttrs parsed, a CSR plan made from the hints."""
    headers, body = split_http(data)
    wire.check_media_type(headers, frozenset({wire.CSRATTRS}), "/csrattrs")
    hints = csrattrs.parse_csrattrs(wire.decode_body(body, headers, "/csrattrs"))
    csrattrs.plan_csr(hints, KeyAlgorithm.EC_P256, SubjectSpec(common_name="fuzz-device"))


_FIRMWARE_POLICY: TrustPolicy | None = None


def _firmware_policy() -> TrustPolicy:
    global _FIRMWARE_POLICY
    if _FIRMWARE_POLICY is None:
        anchor = x509.load_pem_x509_certificate((DATA / "firmware-anchor.pem").read_bytes())
        _FIRMWARE_POLICY = TrustPolicy(anchors=(anchor,))
    return _FIRMWARE_POLICY


def firmware_bundle(data: bytes) -> None:
    """A bundle's prelude, header, manifest and signature blocks, then their verification."""
    stream = io.BytesIO(data)
    header = bundle.read_header(stream)
    verify_header(
        header,
        policy=_firmware_policy(),
        device=DeviceFacts(compatible=header.manifest.compatible, committed_security_version=0),
        now=NOW,
    )


def firmware_manifest(data: bytes) -> None:
    """The manifest block alone (the bundle target reaches it only through a valid header)."""
    parse_manifest(data, max_payload_bytes=bundle.DEFAULT_LIMITS.max_payload_bytes)


def config(data: bytes) -> None:
    """config.toml: decoded as the config file reader does, then parsed and checked."""
    from agent.config import parse_config
    from agent.errors import ConfigError

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:  # what agent.config_file.read_config_text says
        raise ConfigError(f"{WHERE}: config file is not UTF-8 (byte {e.start})") from e
    parse_config(text, source=WHERE)


def scheduler_state(data: bytes) -> None:
    parse_scheduler_state(data, str(WHERE))


def firmware_state_file(data: bytes) -> None:
    firmware_state.parse_state(data, WHERE)


def firmware_status(data: bytes) -> None:
    """The status snapshot as agent.wiring reads it: JSON, then FirmwareStatus.from_dict."""
    from agent.errors import StorageError

    try:
        table = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise StorageError(f"firmware status snapshot {WHERE} is not JSON: {e}") from e
    FirmwareStatus.from_dict(table, where=str(WHERE))


def est_pending(data: bytes) -> None:
    PendingRequest.from_json(data, source=WHERE)


def _env_text(data: bytes) -> str:
    # the tools' output is read as text by subprocess (utf-8, errors replaced)
    return data.decode("utf-8", errors="replace")


def uboot_env(data: bytes) -> None:
    """`fw_printenv` output: name=value lines, then RAUC's U-Boot boot state."""
    where = "U-Boot env (/fuzz/fw_env.config)"
    UBootScheme().state(parse_lines(_env_text(data), where), where)


def grub_env(data: bytes) -> None:
    """`grub-editenv FILE list` output: name=value lines, then RAUC's GRUB boot state."""
    where = "GRUB env (/fuzz/grubenv)"
    GrubScheme().state(parse_lines(_env_text(data), where), where)


_COMMAND_ANCHORS: tuple[x509.Certificate, ...] | None = None
COMMAND_DEVICE = "fuzz-device"


def _command_anchors() -> tuple[x509.Certificate, ...]:
    global _COMMAND_ANCHORS
    if _COMMAND_ANCHORS is None:
        data = (DATA / "command-anchor.pem").read_bytes()
        _COMMAND_ANCHORS = tuple(x509.load_pem_x509_certificates(data))
    return _COMMAND_ANCHORS


class _MemoryReplay:
    """The replay memory's decisions without the disk (a fresh one per input)."""

    def __init__(self) -> None:
        self.state = command_replay.ReplayState()

    def admit(
        self, command_id: str, *, expires_at: datetime, now: datetime, skew: timedelta
    ) -> None:
        self.state = command_replay.admit(
            self.state, command_id, expires_at=expires_at, now=now, skew=skew, capacity=4
        )


def mqtt_command(data: bytes) -> None:
    """A message on the commands topic: the envelope, its signature and signer chain, the
    payload, the replay memory; then the response and event built from a refusal. Checked both
    signed-only and with insecure_unsigned (the lab setting)."""
    for insecure in (False, True):
        try:
            verify_command(
                data,
                device_id=COMMAND_DEVICE,
                anchors=_command_anchors(),
                now=NOW,
                replay=_MemoryReplay(),
                limits=CommandLimits(),
                insecure_unsigned=insecure,
            )
        except CommandRefused as e:
            _one_line("mqtt_command", e)
            body = refused_response(e, at=NOW)
            if len(body) > 1024 or json.loads(body)["code"] != e.code:
                raise ContractViolation(f"mqtt_command: response {body[:100]!r}") from e
            refused_event(e, at=NOW)


def command_replay_state(data: bytes) -> None:
    """The replay memory file as ReplayMemory reads it."""
    command_replay.parse_state(data, str(WHERE))


TARGETS: dict[str, Callable[[bytes], None]] = {
    "est_cacerts": est_cacerts,
    "est_enroll": est_enroll,
    "est_csrattrs": est_csrattrs,
    "firmware_bundle": firmware_bundle,
    "firmware_manifest": firmware_manifest,
    "config": config,
    "scheduler_state": scheduler_state,
    "firmware_state": firmware_state_file,
    "firmware_status": firmware_status,
    "est_pending": est_pending,
    "uboot_env": uboot_env,
    "grub_env": grub_env,
    "mqtt_command": mqtt_command,
    "command_replay_state": command_replay_state,
}


def check(target: str, data: bytes) -> None:
    """Run one input; an AgentError is fine if its message is one line, any other exception
    propagates (a finding)."""
    try:
        TARGETS[target](data)
    except AgentError as e:
        _one_line(target, e)


def _one_line(target: str, e: AgentError) -> None:
    message = str(e)
    if "\n" in message or "\r" in message or not message.strip():
        raise ContractViolation(
            f"{target}: {type(e).__name__} message is not one line: {message!r}"
        ) from e
