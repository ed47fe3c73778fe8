"""agent/renewal.py: the pure renewal policy, case by case and by property (hypothesis)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.renewal import (
    Action,
    CertFacts,
    Failure,
    History,
    RenewalPolicy,
    backoff_cap_seconds,
    decide,
    renewal_point,
)

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
DAY = timedelta(days=1)
POLICY = RenewalPolicy()
CERT = CertFacts(not_before=T0, not_after=T0 + 30 * DAY, serial=0x1234)
FLOOR = T0 - DAY


NO_HISTORY = History()


def run(cert: CertFacts | None = CERT, history: History = NO_HISTORY, now: datetime = T0 + DAY,
        floor: datetime = FLOOR, bootstrap: bool = True, device: str = "gw-1",
        policy: RenewalPolicy = POLICY):  # fmt: skip
    return decide(cert=cert, device_id=device, history=history, now=now, clock_floor=floor,
                  bootstrap_available=bootstrap, policy=policy)  # fmt: skip


def failed(n: int, at: datetime, kind: Failure = Failure.RETRYABLE, **kw: object) -> History:
    return History(failures=n, last_failure=kind, last_attempt=at, **kw)  # type: ignore[arg-type]


def test_a_fresh_certificate_is_renewed_at_its_drawn_point_in_the_window() -> None:
    d = run()
    assert d.action is Action.RENEW
    assert T0 + 30 * DAY * 0.55 <= d.at <= T0 + 30 * DAY * 0.70
    assert d.at == renewal_point(CERT, "gw-1", POLICY)
    assert d.reason.startswith("scheduled at ") and d.reason.endswith("% of the lifetime")


def test_the_point_is_the_same_after_a_restart_and_differs_across_devices_and_certs() -> None:
    assert run(now=T0 + DAY).at == run(now=T0 + 2 * DAY).at  # not re-rolled per check
    points = {renewal_point(CERT, f"gw-{i}", POLICY) for i in range(200)}
    assert len(points) == 200
    assert renewal_point(replace(CERT, serial=1), "gw-1", POLICY) != run().at


def test_a_point_already_past_means_now() -> None:
    d = run(now=T0 + 25 * DAY)
    assert d.action is Action.RENEW and d.at < T0 + 25 * DAY  # act at once


def test_not_enrolled_enrolls_now_then_backs_off() -> None:
    assert run(cert=None) == decide(
        cert=None, device_id="gw-1", history=History(), now=T0 + DAY, clock_floor=FLOOR,
        bootstrap_available=True, policy=POLICY,
    )  # fmt: skip
    d = run(cert=None)
    assert (d.action, d.at) == (Action.ENROLL, T0 + DAY)
    later = run(cert=None, history=failed(3, T0 + DAY))
    assert later.action is Action.ENROLL
    assert T0 + DAY + timedelta(seconds=60) <= later.at <= T0 + DAY + timedelta(seconds=240)


def test_backoff_cap_doubles_to_the_maximum() -> None:
    caps = [backoff_cap_seconds(n, POLICY) for n in range(1, 20)]
    assert caps[:4] == [60, 120, 240, 480]
    assert caps == sorted(caps) and caps[-1] == POLICY.retry_max_seconds
    assert backoff_cap_seconds(10**9, POLICY) == POLICY.retry_max_seconds


def test_a_security_failure_waits_the_maximum_and_says_so() -> None:
    at = T0 + 18 * DAY
    d = run(history=failed(1, at, Failure.SECURITY), now=at)
    assert d.at == at + timedelta(seconds=POLICY.retry_max_seconds)
    assert "security failure" in d.reason


def test_retries_get_denser_as_expiry_nears() -> None:
    near = CERT.not_after - timedelta(hours=1)
    d = run(history=failed(12, near), now=near)
    assert d.at <= near + timedelta(minutes=15)  # a quarter of the hour left
    assert "denser" in d.reason


def test_retry_after_is_honoured_unless_the_certificate_would_expire_first() -> None:
    at = T0 + 18 * DAY
    asked = at + timedelta(hours=6)
    d = run(history=failed(1, at, retry_after_until=asked), now=at)
    assert d.at == asked and "Retry-After" in d.reason
    too_late = CERT.not_after + DAY
    d = run(history=failed(1, at, retry_after_until=too_late), now=at)
    assert d.at < CERT.not_after


def test_expired_re_bootstraps_or_says_it_needs_to() -> None:
    after = CERT.not_after + timedelta(seconds=1)
    d = run(now=after)
    assert (d.action, d.at) == (Action.BOOTSTRAP, after)
    assert "bootstrap credential" in d.reason
    d = run(now=after, bootstrap=False)
    assert d.action is Action.RENEW and "expired, needs bootstrap" in d.reason
    d = run(now=after, bootstrap=False, history=failed(4, after))
    assert d.at == after + timedelta(seconds=POLICY.retry_max_seconds)  # at the cap


def test_a_clock_before_the_floor_is_not_believed() -> None:
    d = run(now=datetime(1970, 1, 1, tzinfo=timezone.utc), floor=T0)
    assert d.action is Action.WAIT
    assert "1970-01-01T00:00:00Z" in d.reason and "not believed" in d.reason
    assert "expired" not in d.reason.split("no certificate")[0]


moments = st.integers(min_value=0, max_value=40 * 86400).map(lambda s: T0 + timedelta(seconds=s))
histories = st.builds(
    History,
    failures=st.integers(min_value=0, max_value=80),
    last_failure=st.sampled_from([None, Failure.RETRYABLE, Failure.SECURITY]),
    last_attempt=st.none() | moments,
    retry_after_until=st.none() | moments,
)
certs = st.builds(
    lambda days, serial: CertFacts(T0, T0 + timedelta(days=days), serial),
    st.integers(min_value=1, max_value=400),
    st.integers(min_value=1, max_value=2**159),
)


def _consistent(history: History, now: datetime) -> bool:
    return history.last_attempt is None or history.last_attempt <= now


@settings(max_examples=400, deadline=None)
@given(cert=certs, history=histories, now=moments, device=st.text(min_size=1, max_size=20))
def test_properties(cert: CertFacts, history: History, now: datetime, device: str) -> None:
    if not _consistent(history, now):
        return
    d = run(cert=cert, history=history, now=now, device=device)
    again = run(cert=cert, history=history, now=now, device=device)
    assert d == again  # the same inputs (a restart) give the same decision
    if now >= cert.not_after:
        assert d.action in (Action.BOOTSTRAP, Action.RENEW)
        return
    assert d.action is Action.RENEW
    deadline = cert.not_after - timedelta(seconds=POLICY.expiry_margin_seconds)
    acted_before_deadline = history.last_attempt is None or history.last_attempt < deadline
    if acted_before_deadline:
        assert d.at <= max(deadline, now)  # never later than expiry while time allows
    if (
        history.failures
        and history.last_attempt is not None
        and history.retry_after_until is not None
        and history.retry_after_until < deadline
        and d.at < history.retry_after_until
    ):
        pytest.fail("earlier than a Retry-After that would not make the certificate expire")
    if history.failures and history.last_attempt is not None:
        assert (
            d.at
            >= history.last_attempt
            + timedelta(seconds=min(POLICY.retry_floor_seconds, POLICY.retry_min_seconds))
            or d.at == deadline
        )


@settings(max_examples=200, deadline=None)
@given(failures=st.integers(min_value=1, max_value=200))
def test_backoff_cap_is_monotone(failures: int) -> None:
    assert backoff_cap_seconds(failures, POLICY) <= backoff_cap_seconds(failures + 1, POLICY)
    assert POLICY.retry_min_seconds <= backoff_cap_seconds(failures, POLICY)
    assert backoff_cap_seconds(failures, POLICY) <= POLICY.retry_max_seconds
