"""The firmware device with its outcomes recorded in root's audit trail (`agent.audit_events`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, BinaryIO

from agent.audit_events import Recorder, failure, manifest_fields, recorded
from agent.firmware.device import CommitResult, FirmwareDevice

if TYPE_CHECKING:
    from agent.firmware.manifest import Manifest


class AuditedFirmwareDevice(FirmwareDevice):
    def __init__(self, *, audit: Recorder, **parts: Any) -> None:
        super().__init__(**parts)
        self.audit = audit

    def verify(self, stream: BinaryIO) -> Manifest:
        try:
            manifest = super().verify(stream)
        except Exception as e:
            self.audit.record("bundle_refused", {"operation": "verify", **failure(e)})
            raise
        self.audit.record(
            "bundle_verified", {"outcome": "ok", "operation": "verify", **manifest_fields(manifest)}
        )
        return manifest

    def install(self, stream: BinaryIO, *, slot: str | None = None) -> tuple[str, Manifest]:
        try:
            target, manifest = super().install(stream, slot=slot)
        except Exception as e:
            fields = failure(e)
            event = "bundle_refused" if fields["security"] else "install"
            self.audit.record(event, {"operation": "install", "slot": slot, **fields})
            raise
        self.audit.record("install", {"outcome": "ok", "slot": target, **manifest_fields(manifest)})
        return target, manifest

    def commit(self) -> CommitResult:
        return recorded(
            self.audit,
            "commit",
            super().commit,
            lambda r: {
                "slot": r.slot,
                "security_version": r.security_version,
                "fell_back_from": r.fell_back_from,
            },
        )

    def rollback(self) -> str:
        return recorded(self.audit, "rollback", super().rollback, lambda s: {"slot": s})
