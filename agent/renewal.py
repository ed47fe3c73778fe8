"""When to renew: a pure decision over the certificate, the failure history and `now`.

No I/O and no clock: the daemon passes `now` and the clock floor in and sleeps until the
decision's `at`. The same inputs always give the same decision, so a restart neither re-rolls a
renewal point nor forgets a backoff (the history is persisted by agent/renewal_state.py).

- **The renewal point** is drawn once per certificate, uniformly in
  [`window_start_fraction`, `window_end_fraction`] of its lifetime, from a hash of the device id
  and the certificate's serial: a fleet enrolled in the same minute spreads over the window, and
  a restart lands on the same point (kubelet draws 70-90% afresh; SPIRE re-draws every check).
- **After a failure**: exponential backoff with full jitter between `retry_min_seconds` and a
  cap that doubles per consecutive failure up to `retry_max_seconds`, drawn from the same hash
  and the failure count. No wait is longer than `max_wait_share_of_time_left` of the time the
  certificate has left, so retries get denser as expiry nears (certmonger's rule), and none
  ends after `notAfter - expiry_margin_seconds` while there is time before it.
- **The disposition decides**: a retryable failure backs off; a security failure (the server's
  answer failed our checks, or it rejected our certificate) waits the maximum and is reported,
  never hammered; a 202's Retry-After is honoured unless the certificate would expire first.
- **After expiry**: re-enroll with the bootstrap credential when one is configured; else report
  "expired, needs bootstrap" and keep trying at the cap.
- **A clock floor** for devices without an RTC: a clock earlier than the newest of the build
  time, the newest notBefore seen and the last state write is not believed; nothing is then
  called expired, and the decision is to look again soon and say why.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = [
    "Action",
    "CertFacts",
    "Decision",
    "Failure",
    "History",
    "RenewalPolicy",
    "backoff_cap_seconds",
    "decide",
    "renewal_point",
]


@dataclass(frozen=True)
class RenewalPolicy:
    #: the renewal point is drawn in this share of the lifetime (0 < start <= end < 1)
    window_start_fraction: float = 0.55
    window_end_fraction: float = 0.70
    #: backoff after consecutive failures: full jitter in [min, cap], cap doubling to max (s)
    retry_min_seconds: float = 60.0
    retry_max_seconds: float = 4 * 3600.0
    #: no wait longer than this share of the time the certificate has left
    max_wait_share_of_time_left: float = 0.25
    #: and none shorter than this (seconds), however close expiry is
    retry_floor_seconds: float = 5.0
    #: aim to be renewed this long before notAfter (seconds)
    expiry_margin_seconds: float = 60.0
    #: while the clock is not believed, look again after this long (seconds)
    clock_recheck_seconds: float = 60.0


class Failure(enum.Enum):
    """What the last attempt's error means for the schedule (from errors.classify)."""

    RETRYABLE = "retryable"  # network, server trouble, interrupted: back off and try again
    SECURITY = "security"  # a trust check failed or our certificate was refused: wait the max


class Action(enum.Enum):
    ENROLL = "enroll"  # no identity yet: enroll with the bootstrap credential
    RENEW = "renew"  # re-enroll with the current identity
    BOOTSTRAP = "bootstrap"  # the identity expired: re-enroll with the bootstrap credential
    WAIT = "wait"  # do nothing; decide again at `at` (the clock is not believed)


@dataclass(frozen=True)
class CertFacts:
    not_before: datetime
    not_after: datetime
    serial: int


@dataclass(frozen=True)
class History:
    #: consecutive failed attempts since the last success (an interrupted one counts)
    failures: int = 0
    last_failure: Failure | None = None
    #: when the last attempt started
    last_attempt: datetime | None = None
    #: a server's Retry-After (202 or 503), as the time before which it asked us not to return
    retry_after_until: datetime | None = None


@dataclass(frozen=True)
class Decision:
    action: Action
    #: when to act (act now if it is not later than now)
    at: datetime
    #: for people: the status line and the log
    reason: str


def _unit(*parts: object) -> float:
    """A number in [0, 1) from a hash of `parts`: deterministic, spread like a uniform draw."""
    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def renewal_point(cert: CertFacts, device_id: str, policy: RenewalPolicy) -> datetime:
    share = policy.window_start_fraction + _unit("point", device_id, cert.serial) * (
        policy.window_end_fraction - policy.window_start_fraction
    )
    return cert.not_before + (cert.not_after - cert.not_before) * share


def backoff_cap_seconds(failures: int, policy: RenewalPolicy) -> float:
    """The upper end of the jittered wait after `failures` consecutive failures (>= 1)."""
    doublings = min(max(failures - 1, 0), 62)  # 2**62 s is far past any max
    return min(policy.retry_max_seconds, policy.retry_min_seconds * 2.0**doublings)


def _backoff(history: History, key: object, policy: RenewalPolicy) -> float:
    if history.last_failure is Failure.SECURITY:
        return policy.retry_max_seconds
    cap = backoff_cap_seconds(history.failures, policy)
    low = min(policy.retry_min_seconds, cap)
    return low + _unit("backoff", key, history.failures) * (cap - low)


def _seconds(delta: timedelta) -> float:
    return delta.total_seconds()


def _retry_time(
    history: History, key: object, policy: RenewalPolicy, not_after: datetime | None
) -> tuple[datetime, str]:
    """When to try again after the failures in `history`, and why."""
    assert history.last_attempt is not None
    start = history.last_attempt
    wait = _backoff(history, key, policy)
    security = history.last_failure is Failure.SECURITY
    why = f"attempt {history.failures + 1} after {history.failures} failure(s), " + (
        "a security failure: waiting the maximum" if security else "backing off"
    )
    if not_after is not None and not_after > start:
        left = _seconds(not_after - start)
        shortened = max(policy.retry_floor_seconds, policy.max_wait_share_of_time_left * left)
        if shortened < wait:
            wait, why = shortened, why + f" (denser: {left:.0f} s of validity left)"
    at = start + timedelta(seconds=wait)
    asked = history.retry_after_until
    if (
        asked is not None
        and asked > at
        and (not_after is None or asked < not_after - _margin(policy))
    ):
        at, why = asked, "the server asked us to come back (Retry-After)"
    return at, why


def _margin(policy: RenewalPolicy) -> timedelta:
    return timedelta(seconds=policy.expiry_margin_seconds)


def decide(
    *,
    cert: CertFacts | None,
    device_id: str,
    history: History,
    now: datetime,
    clock_floor: datetime,
    bootstrap_available: bool,
    policy: RenewalPolicy,
) -> Decision:
    """What to do next and when."""
    if now < clock_floor:
        return Decision(
            Action.WAIT,
            now + timedelta(seconds=policy.clock_recheck_seconds),
            f"the system clock ({now:%Y-%m-%dT%H:%M:%SZ}) is before "
            f"{clock_floor:%Y-%m-%dT%H:%M:%SZ} (build time, a certificate's notBefore or the "
            "last state write): not believed; no certificate is called expired or not yet "
            "valid until it is set",
        )
    if cert is None:
        if history.failures == 0 or history.last_attempt is None:
            return Decision(Action.ENROLL, now, "not enrolled: enrolling")
        at, why = _retry_time(history, "enroll", policy, None)
        return Decision(Action.ENROLL, at, f"not enrolled: {why}")
    key = (device_id, cert.serial)
    if now >= cert.not_after:
        action = Action.BOOTSTRAP if bootstrap_available else Action.RENEW
        what = (
            "expired: re-enrolling with the bootstrap credential"
            if bootstrap_available
            else "expired, needs bootstrap (no bootstrap credential configured): trying to renew"
        )
        if history.failures == 0 or history.last_attempt is None:
            return Decision(action, now, what)
        if not bootstrap_available:  # keep trying, at the cap
            return Decision(
                action, history.last_attempt + timedelta(seconds=policy.retry_max_seconds), what
            )
        at, why = _retry_time(history, key, policy, None)
        return Decision(action, at, f"{what}; {why}")
    if history.failures == 0 or history.last_attempt is None:
        point = renewal_point(cert, device_id, policy)
        lifetime = _seconds(cert.not_after - cert.not_before)
        share = _seconds(point - cert.not_before) / lifetime if lifetime > 0 else 0.0
        return Decision(Action.RENEW, point, f"scheduled at {share:.0%} of the lifetime")
    at, why = _retry_time(history, key, policy, cert.not_after)
    deadline = cert.not_after - _margin(policy)
    if at > deadline and history.last_attempt < deadline:
        at, why = deadline, why + "; before expiry"
    return Decision(Action.RENEW, at, why)
