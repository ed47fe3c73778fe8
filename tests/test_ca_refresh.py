"""The CA refresh policy (agent/ca_refresh.py): when, and what a fetched CA set may replace.

Pure: real certificates from tests/support/ca.py, including a real RFC 7030 4.1.3 root key
update (NewWithNew, NewWithOld, OldWithNew, OldWithOld), and `now` passed in."""

from __future__ import annotations

import datetime as dt
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from agent.ca_refresh import MAX_CA_CERTS, RefreshPolicy, judge, next_refresh
from agent.errors import ChainValidationError, EnrollmentError
from agent.est.memory import ca_set_sha256
from agent.est.response import validate_issued
from tests.support.ca import TestCA, utcnow

NOW = datetime(2026, 6, 1, 12, tzinfo=timezone.utc)
DAY = RefreshPolicy(interval_seconds=86400, retry_min_seconds=60, retry_max_seconds=3600)
SKEW = timedelta(seconds=300)


def _next(device: str = "gw-1", *, failures: int = 0, last: datetime | None = None,
          expiry: datetime | None = None, now: datetime = NOW,
          policy: RefreshPolicy = DAY) -> datetime | None:  # fmt: skip
    return next_refresh(device_id=device, ca_set="abc", now=now, last_attempt=last,
                        failures=failures, expiry=expiry, policy=policy)  # fmt: skip


def test_the_refresh_point_is_within_the_interval_and_the_same_after_a_restart() -> None:
    at = _next()
    assert at is not None and NOW < at <= NOW + timedelta(days=1)
    # a restart an hour later (no memory of the last attempt) lands on the same point
    later = NOW + timedelta(hours=1)
    if at > later:
        assert _next(now=later) == at
    assert _next() == at
    # after a refresh at that point, the next one is an interval later
    assert _next(last=at) == at + timedelta(days=1)


def test_a_fleet_spreads_over_the_interval() -> None:
    points = [_next(f"gw-{i}") for i in range(2000)]
    hours = {int(((p or NOW) - NOW).total_seconds() // 3600) for p in points}
    assert len(hours) == 24  # every hour of the day has refreshes


def test_zero_turns_scheduled_refreshes_off() -> None:
    assert _next(policy=RefreshPolicy(interval_seconds=0)) is None


@given(st.integers(min_value=1, max_value=40), st.text(min_size=1, max_size=8))
def test_backoff_stays_within_min_and_a_doubling_cap(failures: int, device: str) -> None:
    at = _next(device, failures=failures, last=NOW)
    assert at is not None
    wait = (at - NOW).total_seconds()
    cap = min(3600.0, 60.0 * 2 ** (failures - 1))
    assert 60.0 <= wait <= cap
    assert _next(device, failures=failures, last=NOW) == at  # deterministic


def test_a_refused_set_waits_the_cap_at_once() -> None:
    at = next_refresh(device_id="gw-1", ca_set="abc", now=NOW, last_attempt=NOW, failures=1,
                      expiry=None, policy=DAY, security=True)  # fmt: skip
    assert at == NOW + timedelta(seconds=3600)


def test_a_set_near_its_expiry_is_refreshed_more_often() -> None:
    far = _next(expiry=NOW + timedelta(days=365))
    near = _next(expiry=NOW + timedelta(hours=4))  # at most a quarter of the time left
    assert far is not None and near is not None
    assert near <= NOW + timedelta(hours=1)
    gone = _next(expiry=NOW - timedelta(hours=1))  # expired: every retry_min
    assert gone is not None and gone <= NOW + timedelta(seconds=60)


# -- what a fetched set may replace ------------------------------------------------------------


class Rollover:
    """A root and its key update, as tests/support/est_server.py's rollover() makes it."""

    def __init__(self) -> None:
        self.old = TestCA(name="EST root")
        self.new = TestCA(name="EST root")  # the same name, a new key (RFC 4210 4.4)
        link = {"subject": self.old.cert.subject, "ca": True, "lifetime": dt.timedelta(days=900)}
        self.new_with_old = self.old.issue(self.new.key.public_key(), **link)  # type: ignore[arg-type]
        self.old_with_new = self.new.issue(self.old.key.public_key(), **link)  # type: ignore[arg-type]

    def answer(self) -> list:  # type: ignore[type-arg]
        return [self.new.cert, self.new_with_old, self.old_with_new, self.old.cert]


def _judge(fetched: list, anchors: list, current: list):  # type: ignore[no-untyped-def,type-arg]
    return judge(fetched, anchors=anchors, current=current, now=utcnow(), skew=SKEW)


def test_the_same_set_is_not_a_change() -> None:
    root = TestCA()
    verdict = _judge([root.cert], [root.cert], [root.cert])
    assert not verdict.changed and verdict.certificates == (root.cert,)


def test_a_root_key_update_adopts_new_with_new_through_new_with_old() -> None:
    r = Rollover()
    verdict = _judge(r.answer(), [r.old.cert], [r.old.cert])
    assert verdict.changed
    assert verdict.new_roots == (r.new.cert,)
    assert set(verdict.certificates) == set(r.answer())
    assert verdict.previous_sha256 == ca_set_sha256([r.old.cert])
    # a certificate the new key issues now validates against the stored set
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = r.new.issue(key.public_key(), subject="gw-1")
    issued = validate_issued([leaf], requested_key=key.public_key(),
                             ca_certs=verdict.certificates, now=utcnow(), clock_skew=SKEW)  # fmt: skip
    assert issued.certificate == leaf
    # once the old root is gone, the new root alone is accepted: it is in the stored set
    after = _judge([r.new.cert], [r.old.cert], list(verdict.certificates))
    assert after.certificates == (r.new.cert,) and after.changed


def test_a_new_root_without_new_with_old_is_refused_and_so_is_a_stranger() -> None:
    r = Rollover()
    with pytest.raises(ChainValidationError, match="chains to the trust anchor"):
        _judge([r.new.cert], [r.old.cert], [r.old.cert])
    with pytest.raises(ChainValidationError):
        _judge([r.new.cert, r.old_with_new], [r.old.cert], [r.old.cert])
    rogue = TestCA(name="EST root")  # even under the same name
    with pytest.raises(ChainValidationError):
        _judge([rogue.cert], [r.old.cert], [r.old.cert])


def test_strangers_beside_trusted_certificates_are_dropped_not_stored() -> None:
    root = TestCA()
    issuing = TestCA(name="issuing", parent=root)
    rogue = TestCA(name="rogue")
    verdict = _judge([issuing.cert, root.cert, rogue.cert], [root.cert], [root.cert])
    assert set(verdict.certificates) == {issuing.cert, root.cert}
    assert any("rogue" in line for line in verdict.dropped)


def test_an_intermediate_alone_is_accepted_when_it_chains_to_the_anchor() -> None:
    root = TestCA()
    issuing = TestCA(name="issuing", parent=root)
    assert _judge([issuing.cert], [root.cert], []).certificates == (issuing.cert,)


def test_bounds_expired_and_non_ca_certificates() -> None:
    root = TestCA()
    with pytest.raises(EnrollmentError, match=f"more than {MAX_CA_CERTS}"):
        _judge([root.cert] * (MAX_CA_CERTS + 1), [root.cert], [])
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = root.issue(key.public_key(), subject="not a CA")
    with pytest.raises(EnrollmentError, match="none of the certificates"):
        _judge([leaf], [root.cert], [])
    old = root.issue(key.public_key(), subject="old CA", ca=True,
                     not_before=utcnow() - dt.timedelta(days=20), lifetime=dt.timedelta(days=1))  # fmt: skip
    verdict = _judge([old, root.cert], [root.cert], [])
    assert verdict.certificates == (root.cert,)
    assert any("not valid now" in line for line in verdict.dropped)


def test_an_anchor_that_is_not_a_root_is_kept_as_itself_not_the_root_above_it() -> None:
    root = TestCA(name="root")
    issuing = TestCA(name="issuing", parent=root)
    verdict = _judge([root.cert, issuing.cert], [issuing.cert], [])
    assert verdict.certificates == (issuing.cert,)
    assert verdict.dropped == ("'CN=root': does not chain to the trust anchor",)


def test_kept_certificates_stay_in_the_answer_order_and_a_refusal_says_what_is_kept() -> None:
    root = TestCA(name="root")
    issuing = TestCA(name="issuing", parent=root)
    # the root is accepted before the certificate it vouches for; the answer's order stays
    assert _judge([issuing.cert, root.cert], [root.cert], []).certificates == (
        issuing.cert,
        root.cert,
    )
    rogue = TestCA(name="rogue")
    with pytest.raises(
        ChainValidationError, match=r"chains to the trust anchor \(.*; no CA set is stored$"
    ):
        _judge([rogue.cert], [root.cert], [])
    with pytest.raises(
        ChainValidationError, match=r"or the stored CA set \(.*; the stored CA set is kept$"
    ):
        _judge([rogue.cert], [root.cert], [root.cert])
