"""`status`'s exit code, in the spirit of certmonger's `getcert status`: one code per condition a
health check or a fleet tool acts on differently. Pure.

In order of precedence (the first that holds wins):

- 81 not enrolled: no identity (`devid-agent enroll`)
- 86 identity unusable: the identity cannot be read (its key or certificate file is missing or
  damaged), its key does not load or sign for its certificate, or its certificate is not valid
  yet (the clock is behind: see `doctor`)
- 82 expired: the certificate's validity ended; it cannot renew itself (`enroll` again)
- 85 renewal failing: the scheduler's last attempts failed (its state file counts them) and
  less than `status.renewal_failing_share` of the certificate's lifetime is left
- 87 service not running: `control.enabled` is true (the default: the service is expected) and
  the control socket is absent, refuses or does not answer. Devices that only use the one-shot
  enroll unit set `control.enabled = false` and never get 87 (without the service the scheduler's
  state is not written, so 85 is not reported there either; a failed `renew` exits non-zero)
- 74 a part of the status could not be read (bootloader environment, pending request, ...)
- 0 healthy

An identity condition wins over 87: the identity is what a fleet tool acts on first (a device
not enrolled whose service is down is "not enrolled"; `status` prints both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.metrics import RenewalFacts
    from agent.status import AgentStatus

HEALTHY = 0
PART_UNREADABLE = 74
NOT_ENROLLED = 81
EXPIRED = 82
RENEWAL_FAILING = 85
IDENTITY_UNUSABLE = 86
SERVICE_NOT_RUNNING = 87


def status_code(status: AgentStatus, renewal: RenewalFacts | None, *, failing_share: float) -> int:
    identity = status.identity
    if identity.state == "none":
        return NOT_ENROLLED
    if identity.state in ("unreadable", "not_yet_valid") or identity.key_usable is False:
        return IDENTITY_UNUSABLE
    if identity.state == "expired":
        return EXPIRED
    failures = renewal.consecutive_failures if renewal is not None else None
    left = identity.lifetime_left
    if failures and left is not None and left < failing_share:
        return RENEWAL_FAILING
    service = status.service
    if service is not None and service.expected and not service.running:
        return SERVICE_NOT_RUNNING
    if status.errors:
        return PART_UNREADABLE
    return HEALTHY
