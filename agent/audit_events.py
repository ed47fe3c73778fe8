"""What the agent records in its audit trail, around the operations that exist today.

`agent.audit_enroll.AuditedEnroller` and `agent.audit_firmware.AuditedFirmwareDevice` are the
enroller and the firmware device with each operation's outcome recorded (`agent.wiring` builds
them, so the CLI and the daemon record the same events). Events: `enroll`, `renewal`,
`identity_repaired`, `bundle_verified`, `bundle_refused`, `install`, `commit`, `rollback`, and
from the control socket (agent/control/server.py) `control_peer_refused` and `control_command`
(an acting request accepted: op, uid, pid); each
with `outcome` "ok" or "failed" (and the error's disposition and one-line message when it
failed). What goes in is public: subjects, serials, issuers, validity, versions, digests, slot
names; never a key, password or token.

Recording never changes an operation's result (`agent.audit_log`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from agent.errors import classify

if TYPE_CHECKING:
    from agent.enroll import EnrollResult
    from agent.firmware.manifest import Manifest

T = TypeVar("T")


class Recorder(Protocol):
    def record(self, event: str, fields: dict[str, Any] | None = None) -> bool: ...


def failure(error: BaseException) -> dict[str, Any]:
    kind = classify(error).kind
    return {
        "outcome": "failed",
        "disposition": kind.value,
        "security": kind.security,
        "error": str(error),
    }


def identity_fields(result: EnrollResult) -> dict[str, Any]:
    cert = result.identity.certificate
    return {
        "generation": result.identity.generation,
        "subject": cert.subject.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "issuer": cert.issuer.rfc4514_string(),
        "not_after": cert.not_valid_after_utc.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "key_store": result.key_store,
        "new_key": result.new_key,
        "tls_version": result.tls_version,
        "proof_of_possession": result.proof_of_possession,
    }


def manifest_fields(manifest: Manifest) -> dict[str, Any]:
    return {
        "compatible": manifest.compatible,
        "version": manifest.version,
        "security_version": manifest.security_version,
        "payload_bytes": manifest.payload_size,
        "payload_digest": f"{manifest.hash_algorithm}:{manifest.digest.hex()}",
    }


def recorded(
    audit: Recorder, event: str, run: Callable[[], T], fields: Callable[[T], dict[str, Any]]
) -> T:
    try:
        result = run()
    except Exception as e:
        audit.record(event, failure(e))
        raise
    audit.record(event, {"outcome": "ok", **fields(result)})
    return result
