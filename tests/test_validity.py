"""`validity(cert, now, skew)`: the one rule (RFC 5280: notBefore..notAfter inclusive, skew
tolerated in both directions), at and around every boundary."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.validity import State, validity
from tests.support.ca import TestCA

START = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
END = START + timedelta(days=10)
S = timedelta(seconds=1)
SKEW = timedelta(seconds=300)


@pytest.fixture(scope="module")
def cert() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return TestCA().issue(key, subject="gw", not_before=START, not_after=END)


@pytest.mark.parametrize(
    ("now", "skew", "state"),
    [
        (START - S, timedelta(0), State.NOT_YET_VALID),
        (START, timedelta(0), State.VALID),  # notBefore inclusive
        (END, timedelta(0), State.VALID),  # notAfter inclusive (RFC 5280 4.1.2.5)
        (END + S, timedelta(0), State.EXPIRED),
        (START - SKEW, SKEW, State.VALID),  # a clock 300 s behind is tolerated
        (START - SKEW - S, SKEW, State.NOT_YET_VALID),
        (END + SKEW, SKEW, State.VALID),  # a clock 300 s ahead is tolerated
        (END + SKEW + S, SKEW, State.EXPIRED),
        (START + timedelta(days=5), SKEW, State.VALID),
    ],
)
def test_states_at_the_boundaries(
    cert: x509.Certificate, now: datetime, skew: timedelta, state: State
) -> None:
    v = validity(cert, now, skew)
    assert v.state is state
    assert v.valid is (state is State.VALID)
    assert (v.not_before, v.not_after) == (START, END)


def test_seconds_and_share_left(cert: x509.Certificate) -> None:
    half = validity(cert, START + timedelta(days=5))
    assert half.seconds_left == 5 * 86400 and half.lifetime_left == 0.5
    assert validity(cert, START - timedelta(days=1)).lifetime_left == 1.0
    after = validity(cert, END + timedelta(days=1))
    assert after.seconds_left == -86400 and after.lifetime_left == 0.0


def test_negative_skew_is_refused(cert: x509.Certificate) -> None:
    with pytest.raises(ValueError, match="skew"):
        validity(cert, START, -S)
