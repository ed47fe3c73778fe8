"""The error tree, and `classify(error) -> Disposition`: what a caller should do about an error.

One root (`AgentError`, defined with hal's errors in the leaf `hal.errors` and re-exported here);
retryable and security branches kept apart. Every message is one line that names what was wrong
and where.

`classify` is pure (it looks only at the error and its cause chain). The CLI turns its answer
into an exit code (`agent/cli`, README "Exit codes"); the scheduler will turn it into the next
attempt. The kinds, from "try again" to "a person must act":

- RETRY_SOON: another local process holds the lock (`Busy`): retry in seconds, no backoff growth.
- RETRY_LATER: network down, timeout, 5xx without Retry-After: retry with backoff and jitter.
- WAIT_UNTIL: 202 pending, or 5xx with Retry-After: nothing before `wait_seconds` have passed.
- BAD_RESPONSE: the server answered with something unusable: retry later with backoff, report.
- REFUSED: the server refused us (401/403/other 4xx): an operator fixes credentials or policy.
- CONFLICT: local state forbids this command (a request of the other kind is pending).
- NOT_ENROLLED: no identity (`renew` before `enroll`): enroll with the bootstrap credential.
- IDENTITY_EXPIRED: the identity expired, so it cannot renew: enroll with the bootstrap credential.
- CLIENT_REJECTED: the server's TLS alert rejected our certificate (unknown CA, bad, expired,
  revoked): a security event; record it, alert, do not retry blindly.
- SECURITY_EVENT: a trust check failed (chain, signature, rollback): never retry the same input.
- LOCAL_FAULT: TPM, bootloader environment, slot, counter or disk failed: needs repair.
- CONFIG: the configuration is wrong: fix it; retrying never helps.
- INTERNAL: an exception that is not ours, or an unclassified branch (a bug): report it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from hal.errors import (
    AgentError,
    BootControlError,
    Busy,
    HalError,
    KeyStoreError,
    ProviderError,
    StorageError,
    TrustError,
)

__all__ = [
    "AgentError",
    "BootControlError",
    "Busy",
    "ChainValidationError",
    "ConfigError",
    "Disposition",
    "EnrollmentError",
    "EnrollmentPending",
    "FirmwareVerificationError",
    "HalError",
    "IdentityExpired",
    "KeyStoreError",
    "Kind",
    "NotEnrolled",
    "ProviderError",
    "Reported",
    "RollbackError",
    "StateConflict",
    "StorageError",
    "TransportError",
    "TrustError",
    "classify",
]


class ConfigError(AgentError):
    """The configuration is missing, malformed or inconsistent."""


class TransportError(AgentError):
    """The network failed or the server asked us to come back later. May be retried."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after  # seconds, when the server said so


class EnrollmentError(AgentError):
    """The EST server refused us or answered with something we cannot use."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EnrollmentPending(AgentError):
    """The server accepted the request for manual approval (202); come back after `retry_after`."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotEnrolled(AgentError):
    """The command needs an identity and there is none (`renew` before `enroll`)."""


class IdentityExpired(AgentError):
    """The current identity expired, so it cannot authenticate a renewal; enroll again."""


class StateConflict(AgentError):
    """Local state forbids this command now (a request of the other kind is pending)."""


class ChainValidationError(TrustError):
    """A certificate does not chain to the configured trust anchor, or is not valid now."""


class FirmwareVerificationError(TrustError):
    """A firmware bundle failed verification."""


class RollbackError(TrustError):
    """A firmware bundle's security version is below the committed one."""


# ---------------------------------------------------------------------------------------------
# Dispositions


class Kind(enum.Enum):
    """What to do about an error (the table in this module's opening comment)."""

    RETRY_SOON = "retry_soon"
    RETRY_LATER = "retry_later"
    WAIT_UNTIL = "wait_until"
    BAD_RESPONSE = "bad_response"
    REFUSED = "refused"
    CONFLICT = "conflict"
    NOT_ENROLLED = "not_enrolled"
    IDENTITY_EXPIRED = "identity_expired"
    CLIENT_REJECTED = "client_rejected"
    SECURITY_EVENT = "security_event"
    LOCAL_FAULT = "local_fault"
    CONFIG = "config"
    INTERNAL = "internal"

    @property
    def retryable(self) -> bool:
        """A later attempt with the same config and state may succeed without a person."""
        return self in _RETRYABLE

    @property
    def reenroll(self) -> bool:
        """The way forward is a fresh enrollment with the bootstrap credential."""
        return self in (Kind.NOT_ENROLLED, Kind.IDENTITY_EXPIRED)

    @property
    def security(self) -> bool:
        """Record it as a security event; never retry it blindly."""
        return self in (Kind.CLIENT_REJECTED, Kind.SECURITY_EVENT)


_RETRYABLE = frozenset({Kind.RETRY_SOON, Kind.RETRY_LATER, Kind.WAIT_UNTIL, Kind.BAD_RESPONSE})


@dataclass(frozen=True)
class Disposition:
    kind: Kind
    #: WAIT_UNTIL: seconds from the error to the earliest next attempt (as the server said)
    wait_seconds: float | None = None

    def until(self, now: datetime, *, maximum_seconds: float) -> datetime | None:
        """The earliest next attempt for an error seen at `now`, the wait capped at
        `maximum_seconds` (a server's Retry-After of 1e12 s must not overflow a datetime)."""
        if self.wait_seconds is None:
            return None
        return now + timedelta(seconds=max(0.0, min(self.wait_seconds, maximum_seconds)))


#: TLS alerts by which a server rejects the client certificate we presented (OpenSSL's reason
#: names end with these: TLSV1_ALERT_UNKNOWN_CA, SSLV3_ALERT_BAD_CERTIFICATE, ...)
CLIENT_CERT_ALERTS = (
    "ALERT_UNKNOWN_CA",
    "ALERT_BAD_CERTIFICATE",
    "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_CERTIFICATE_REVOKED",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_UNSUPPORTED_CERTIFICATE",
)


class Reported(AgentError):
    """An error another process of the agent met and classified (the service's attempt process,
    agent/attempt_process.py): its message and disposition travel here as they were."""

    def __init__(self, message: str, disposition: Disposition) -> None:
        super().__init__(message)
        self.disposition = disposition


def _client_cert_alert(error: BaseException) -> bool:
    """Somewhere in the cause chain, an SSL error whose reason is a client-certificate alert.

    Duck-typed on `reason` (ssl.SSLError's attribute) so that this module needs no `ssl`."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        reason = getattr(e, "reason", None)
        if isinstance(reason, str) and reason.upper().endswith(CLIENT_CERT_ALERTS):
            return True
        e = e.__cause__ or e.__context__
    return False


def classify(error: BaseException) -> Disposition:
    """What to do about `error`. Pure: looks only at the error and its causes."""
    if isinstance(error, Reported):
        return error.disposition
    if isinstance(error, ConfigError):
        return Disposition(Kind.CONFIG)
    if isinstance(error, Busy):
        return Disposition(Kind.RETRY_SOON)
    if isinstance(error, EnrollmentPending):
        return Disposition(Kind.WAIT_UNTIL, wait_seconds=error.retry_after)
    if isinstance(error, NotEnrolled):
        return Disposition(Kind.NOT_ENROLLED)
    if isinstance(error, IdentityExpired):
        return Disposition(Kind.IDENTITY_EXPIRED)
    if isinstance(error, StateConflict):
        return Disposition(Kind.CONFLICT)
    if isinstance(error, TransportError):
        if _client_cert_alert(error):
            return Disposition(Kind.CLIENT_REJECTED)
        if error.retry_after is not None:
            return Disposition(Kind.WAIT_UNTIL, wait_seconds=error.retry_after)
        return Disposition(Kind.RETRY_LATER)
    if isinstance(error, EnrollmentError):
        if error.status is not None and 400 <= error.status < 500:
            return Disposition(Kind.REFUSED)
        return Disposition(Kind.BAD_RESPONSE)
    if isinstance(error, TrustError):
        return Disposition(Kind.SECURITY_EVENT)
    if isinstance(error, HalError):
        return Disposition(Kind.LOCAL_FAULT)
    if isinstance(error, AgentError):  # a new branch nobody classified yet: a person looks
        return Disposition(Kind.INTERNAL)
    if isinstance(error, OSError):  # a disk or device error no module wrapped
        return Disposition(Kind.LOCAL_FAULT)
    return Disposition(Kind.INTERNAL)
