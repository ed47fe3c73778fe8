"""The enroller with its outcomes recorded in the audit trail (`agent.audit_events`)."""

from __future__ import annotations

from typing import Any

from agent.audit_events import Recorder, failure, identity_fields, recorded
from agent.enroll import Enroller, EnrollResult


class AuditedEnroller(Enroller):
    def __init__(self, *, audit: Recorder, **parts: Any) -> None:
        super().__init__(**parts)
        self.audit = audit

    def _repaired(self, result: EnrollResult) -> EnrollResult:
        if result.repair is not None:
            self.audit.record(
                "identity_repaired",
                {
                    "damaged_generation": result.repair.damaged,
                    "reason": result.repair.reason,
                    "fell_back_to": result.repair.fell_back_to,
                },
            )
        return result

    def enroll(self, *, force: bool = False) -> EnrollResult:
        try:
            result = self._repaired(super().enroll(force=force))
        except Exception as e:
            self.audit.record("enroll", {"force": force, **failure(e)})
            raise
        if result.changed:
            self.audit.record(
                "enroll", {"outcome": "ok", "force": force, **identity_fields(result)}
            )
        return result

    def renew(self, *, reuse_key: bool = False) -> EnrollResult:
        def run() -> EnrollResult:
            return self._repaired(super(AuditedEnroller, self).renew(reuse_key=reuse_key))

        return recorded(self.audit, "renewal", run, identity_fields)
