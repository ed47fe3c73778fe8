"""One rule for "is this certificate valid at `now`", give or take the device clock's skew.

Pure. RFC 5280 4.1.2.5: a certificate is valid from notBefore through notAfter, both inclusive.
`skew` tolerates a device clock that is off in either direction: a certificate is not yet valid
only when `now + skew` is still before notBefore, and expired only when `now - skew` is after
notAfter. Used for the device's own identity (enroll, renew, status) and for what the EST server
sends (the issued certificate, the CA certificates).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509


__all__ = ["State", "Validity", "validity"]


class State(enum.Enum):
    NOT_YET_VALID = "not_yet_valid"
    VALID = "valid"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Validity:
    state: State
    not_before: datetime
    not_after: datetime
    #: seconds from `now` to notAfter (negative once past it; skew not applied)
    seconds_left: float
    #: share of the lifetime still ahead of `now`, 0.0 .. 1.0
    lifetime_left: float

    @property
    def valid(self) -> bool:
        return self.state is State.VALID


def validity(cert: x509.Certificate, now: datetime, skew: timedelta = timedelta(0)) -> Validity:
    if skew < timedelta(0):
        raise ValueError("skew must not be negative")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now + skew < start:
        state = State.NOT_YET_VALID
    elif now - skew > end:
        state = State.EXPIRED
    else:
        state = State.VALID
    lifetime = (end - start).total_seconds()
    left = (end - now).total_seconds()
    share = max(0.0, min(1.0, left / lifetime)) if lifetime > 0 else 0.0
    return Validity(state, start, end, left, share)
