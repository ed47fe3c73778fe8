"""The channel's pure parts: topics, messages, reconnect rounds on a per-device phase grid
and failover, the offline queue, what a broker's refusal means."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from agent.components import Event
from agent.mqtt import messages
from agent.mqtt.backoff import LOST_SPREAD, START_SPREAD, ReconnectPlan, ReconnectPolicy
from agent.mqtt.commands import Refused, refuse_all
from agent.mqtt.queue import EventQueue
from agent.mqtt.rejection import from_connack, from_tls_reason, untrusted_broker
from agent.mqtt.topics import Topics

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def test_topics() -> None:
    t = Topics("fleet/eu", "gw-7")
    assert (t.status, t.events, t.commands, t.responses) == (
        "fleet/eu/gw-7/status", "fleet/eu/gw-7/events", "fleet/eu/gw-7/commands",
        "fleet/eu/gw-7/commands/response",
    )  # fmt: skip
    for bad in ("gw/7", "gw+", "gw#", "gw\x00", ""):
        with pytest.raises(ValueError, match="device id"):
            Topics("devid", bad)


def test_messages_are_versioned_json_and_bounded() -> None:
    event = Event("rotated", NOW, {"generation": 2}, source="")
    m = messages.event_message("gw-7", 5, event, 3)
    assert json.loads(messages.encode(m)) == {
        "schema_version": 1, "kind": "event", "device": "gw-7", "seq": 5, "event": "rotated",
        "at": "2026-12-01T12:00:00Z", "source": "daemon", "detail": {"generation": 2},
        "dropped_before": 3,
    }  # fmt: skip
    big = messages.online_status("gw-7", NOW, {"x": "y" * 5000}, {})
    data = messages.bounded(big, 1024)
    assert len(data) <= 1024 and "truncated" in json.loads(data)
    will = json.loads(messages.encode(messages.offline_status("gw-7", NOW, "connection lost")))
    assert will["online"] is False and will["reason"] == "connection lost"


BOUNDS = st.tuples(
    st.floats(0.1, 600, allow_nan=False), st.floats(0.1, 86400, allow_nan=False)
).map(sorted)


@given(BOUNDS, st.sampled_from([START_SPREAD, LOST_SPREAD, 1.0, 1000.0]))
@example([0.1, 0.10000000000000002], START_SPREAD)  # max - min one ulp: a first step of 2e-17
@example([5.0, 5.0], LOST_SPREAD)
def test_the_grid_starts_at_the_lower_bound_and_its_steps_grow_to_the_upper_bound(
    bounds: list[float], spread: float
) -> None:
    low, high = bounds
    s = ReconnectPolicy(low, high).schedule(spread)
    assert s.offset(0) == low and s.offset(-1) == low
    if s.first > 0:  # the first window: [min, min x spread], within [min, max]
        assert s.offset(1) <= min(low * spread, high) * (1 + 1e-9)
    xs = [i / 2 for i in range(200)]  # the knee: < 60 even when max - min is one ulp
    offsets = [s.offset(x) for x in xs]
    assert offsets == sorted(offsets)
    steps = [s.offset(x + 1) - s.offset(x) for x in xs]
    for a, b in itertools.pairwise(steps):  # the step (the cap of the wait) is monotone
        assert a <= b + 1e-9 * high
    assert all(step <= high * (1 + 1e-9) for step in steps)
    assert steps[-1] == pytest.approx(high)  # at the upper bound, then in steps of it
    # position() inverts offset(), compared in seconds (x is ill-conditioned if max - min is an ulp)
    for x in xs:
        t = s.offset(x)
        assert s.offset(s.position(t)) == pytest.approx(t, rel=1e-9)
        phase = x % 1
        assert t <= s.next_point(t, phase) <= t + high * (1 + 1e-9)


def test_the_first_windows_at_the_defaults() -> None:
    policy = ReconnectPolicy(1.0, 120.0)
    lost, start = policy.schedule(LOST_SPREAD), policy.schedule(START_SPREAD)
    assert (lost.offset(0), lost.offset(1)) == (1.0, pytest.approx(16.0))
    assert (start.offset(0), start.offset(1)) == (1.0, pytest.approx(2.0))
    assert [round(start.offset(k + 1) - start.offset(k), 6) for k in range(5)] == [1, 2, 4, 8, 16]
    assert start.offset(40) - start.offset(39) == pytest.approx(120.0)
    assert policy.schedule(LOST_SPREAD).offset(1e9) < 1.2e11  # no overflow, however long
    tight = ReconnectPolicy(5.0, 5.0).schedule(LOST_SPREAD)  # min = max: every step is max
    assert [tight.offset(k) for k in range(3)] == [5.0, 10.0, 15.0]


EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["failed", "failed", "failed", "slow", "lost", "now", "connected"]),
        st.floats(0, 300, allow_nan=False),  # how long the attempt took (or the connection held)
    ),
    max_size=40,
)


@given(BOUNDS, st.integers(1, 3), st.integers(0, 2**32), EVENTS)
def test_every_delay_stays_within_the_bounds_and_the_plan_is_deterministic_given_its_seed(
    bounds: list[float], brokers: int, seed: int, events: list[tuple[str, float]]
) -> None:
    low, high = bounds
    policy = ReconnectPolicy(low, high)

    def run() -> list[datetime | None]:
        plan = ReconnectPlan(brokers, policy, random.Random(seed))
        now, ats = NOW, []
        for event, took in events:
            now = max(now, plan.at or now) + timedelta(seconds=took)
            index = plan.index
            if event == "failed":
                plan.failed(now)
            elif event == "slow":
                plan.failed(now, slow=True)
            elif event == "lost":
                plan.lost(now)
            elif event == "now":
                plan.now(now)
            else:
                plan.connected(now)
            ats.append(plan.at)
            if event == "connected" or event == "now":
                assert plan.due(now)
                continue
            assert plan.at is not None
            wait = (plan.at - now).total_seconds()
            if event == "failed" and index + 1 < brokers:
                assert wait == 0 and plan.index == index + 1  # failover: the next one at once
                continue
            assert plan.index == 0
            floor = max(low, high / 2) if event == "slow" else low
            assert floor - 1e-6 <= wait <= high + 1e-6, (event, wait)  # datetime: to the µs
        return ats

    assert run() == run()


def test_a_broker_that_stays_down_is_tried_once_per_upper_bound() -> None:
    plan = ReconnectPlan(1, ReconnectPolicy(1.0, 120.0), random.Random(5))
    plan.lost(NOW)
    rounds = []
    while plan.at is not None and plan.at < NOW + timedelta(hours=1):
        rounds.append(plan.at)
        plan.failed(plan.at)
    waits = [(b - a).total_seconds() for a, b in itertools.pairwise(rounds)]
    assert waits == sorted(waits) and waits[-1] == pytest.approx(120.0)  # backs off to the cap
    assert len(rounds) <= 3600 / 120 + 5  # paho's doubling from 1 s: 36 in the hour


def test_the_grid_keeps_its_phase_and_skips_the_points_an_attempt_ran_over() -> None:
    plan = ReconnectPlan(1, ReconnectPolicy(1.0, 120.0), random.Random(9))
    plan.lost(NOW)
    assert plan.since == NOW and plan.schedule is not None
    grid = [NOW + timedelta(seconds=plan.schedule.offset(k + plan.phase)) for k in range(12)]
    assert plan.at == grid[0]
    plan.failed(grid[0] + timedelta(seconds=0.5))  # a quick failure: the next point
    assert plan.at == grid[1]
    plan.now(grid[1] - timedelta(seconds=3))  # a new identity: at once, the grid stays
    plan.failed(grid[1] - timedelta(seconds=2.5))
    assert plan.at == grid[1]
    plan.failed(grid[2] - timedelta(seconds=0.5))  # ran to within min of a point: skip it
    assert plan.at == grid[3]
    plan.failed(grid[3] + timedelta(seconds=1), slow=True)  # a refusal: slow, the grid stays
    assert plan.since == NOW and plan.at is not None
    assert plan.at >= grid[3] + timedelta(seconds=61)
    plan.failed(plan.at)
    assert plan.at in grid  # back on the same grid, at the same phase


def test_a_broker_that_accepts_and_drops_us_is_backed_off_too() -> None:
    plan = ReconnectPlan(1, ReconnectPolicy(1.0, 120.0), random.Random(4))
    plan.lost(NOW)
    first_grid = plan.since
    rounds = []
    while plan.at is not None and plan.at < NOW + timedelta(hours=1):
        at = plan.at
        rounds.append(at)
        plan.connected(at)  # accepted, then dropped half a second later
        plan.lost(at + timedelta(seconds=0.5))
    assert plan.since == first_grid  # one grid all along
    waits = [(b - a).total_seconds() for a, b in itertools.pairwise(rounds)]
    assert waits == sorted(waits) and waits[-1] == pytest.approx(120.0)
    assert len(rounds) <= 3600 / 120 + 5
    held = rounds[-1] + timedelta(seconds=120)
    plan.connected(rounds[-1])
    plan.lost(held)  # a connection that held max_seconds: spread anew from the first window
    assert plan.since == held and plan.at is not None
    assert held + timedelta(seconds=1) <= plan.at <= held + timedelta(seconds=16)


@pytest.mark.parametrize("down", [1.0, 5.0, 10.0, 30.0, 600.0])
def test_a_fleet_comes_back_spread_whenever_the_broker_returns(down: float) -> None:
    """1,000 devices lose the broker at once; it is back after `down`: the busiest second of
    their returns holds at most 3x the mean second until 99% are back (bench/bench_mqtt.py)."""
    rng = random.Random(1)
    back = []
    for _ in range(1000):
        plan = ReconnectPlan(1, ReconnectPolicy(1.0, 120.0), rng)
        plan.lost(NOW)
        assert plan.at is not None
        while (plan.at - NOW).total_seconds() < down:
            plan.failed(plan.at)
        back.append((plan.at - NOW).total_seconds() - down)
    back.sort()
    window = math.ceil(back[989])
    assert window >= 10  # not all in a few seconds either
    busiest = max(Counter(int(t) for t in back).values())
    assert busiest <= 3 * 990 / window


def test_failover_in_order_then_a_round_on_the_grid() -> None:
    plan = ReconnectPlan(3, ReconnectPolicy(1.0, 10.0), random.Random(3))
    assert plan.due(NOW) and plan.index == 0
    plan.failed(NOW)
    assert (plan.index, plan.at) == (1, NOW)
    plan.failed(NOW)
    assert (plan.index, plan.at) == (2, NOW)
    plan.failed(NOW)  # the whole list failed: back to the first, after a draw
    assert plan.index == 0 and plan.at is not None
    assert NOW + timedelta(seconds=1) <= plan.at <= NOW + timedelta(seconds=2)
    assert not plan.due(NOW)
    plan.failed(NOW, slow=True)  # refused our identity: the longest waits
    assert plan.index == 0 and plan.at is not None and plan.at >= NOW + timedelta(seconds=5)
    plan.connected(NOW)
    assert plan.due(NOW) and plan.failures == 0
    later = NOW + timedelta(hours=1)
    plan.lost(later)  # the connection held: a new grid, spread wide at once (1 .. 10 s here)
    assert plan.since == later and plan.at is not None
    assert later + timedelta(seconds=1) <= plan.at <= later + timedelta(seconds=10)
    lost = []
    for seed in range(200):
        p = ReconnectPlan(1, ReconnectPolicy(1.0, 120.0), random.Random(seed))
        p.lost(NOW)
        assert p.at is not None
        lost.append((p.at - NOW).total_seconds())
    assert 1.0 <= min(lost) < 2.0 and 15.0 < max(lost) <= 16.0


def test_a_slow_retry_is_drawn_in_the_upper_half_of_the_upper_bound_never_near_the_lower() -> None:
    for seed in range(200):
        plan = ReconnectPlan(2, ReconnectPolicy(1.0, 120.0), random.Random(seed))
        plan.failed(NOW, slow=True)  # no failover either: the same refusal from the next
        assert plan.index == 0 and plan.at is not None
        assert NOW + timedelta(seconds=60) <= plan.at <= NOW + timedelta(seconds=120)
    tight = ReconnectPolicy(3.0, 4.0)  # half the max is below the min: the min holds
    assert all(3.0 <= tight.slow_delay(random.Random(s)) <= 4.0 for s in range(50))


def test_the_offline_queue_drops_the_oldest_and_reports_the_count_once() -> None:
    q = EventQueue(3)
    for i in range(5):
        q.add(Event("rotated", NOW, {"i": i}))
    assert len(q) == 3 and q.dropped_total == 2
    first, second, third = q.unsent()
    assert first.event.detail["i"] == 2
    assert q.drops_for(first) == 2 and q.drops_for(second) == 0
    q.sending(first, 11)
    q.sending(second, 12)
    assert q.acknowledged(11) and not q.acknowledged(11)
    q.connection_ended()  # 12 was in flight: it goes again, with the same drop count
    assert [item.seq for item in q.unsent()] == [second.seq, third.seq]
    assert q.drops_for(first) == 2


@pytest.mark.parametrize(
    ("reason", "name", "renew", "identity"),
    [
        ("TLSV1_ALERT_UNKNOWN_CA", "unknown_ca", False, True),
        ("SSLV3_ALERT_CERTIFICATE_EXPIRED", "certificate_expired", True, True),
        ("SSLV3_ALERT_CERTIFICATE_REVOKED", "certificate_revoked", True, True),
        ("SSLV3_ALERT_BAD_CERTIFICATE", "bad_certificate", False, True),
        ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "certificate_required", False, True),
        ("CERTIFICATE_VERIFY_FAILED", "broker_untrusted", False, False),
    ],
)
def test_tls_reasons(reason: str, name: str, renew: bool, identity: bool) -> None:
    got = from_tls_reason(reason, "x")
    assert got is not None
    assert (got.reason, got.renew, got.identity) == (name, renew, identity)
    assert got.security is (not identity)  # we refused the broker: a security event


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (62, "its certificate is for another host name"),
        (10, "its certificate has expired (or this device's clock is ahead)"),
        (19, "its chain ends in a root that is not in mqtt.ca_file (another CA: a man in the"),
        (2, "its certificate's issuer is not in mqtt.ca_file"),
        (None, "its certificate was refused"),
    ],
)
def test_an_untrusted_broker_is_named_with_the_check_that_failed(
    code: int | None, words: str
) -> None:
    got = untrusted_broker("localhost:8883", code, "OpenSSL's words")
    assert got.reason == "broker_untrusted" and got.security and not got.identity
    assert got.message.startswith(f"broker localhost:8883 is not trusted: {words}")
    assert got.message.endswith("(OpenSSL's words)") and not got.renew


def test_connack_codes_and_unknown_reasons() -> None:
    assert (
        from_tls_reason(None, "x") is None and from_tls_reason("WRONG_VERSION_NUMBER", "") is None
    )
    got = from_connack(0x87, "Not authorized")
    assert got is not None and got.reason == "not_authorized" and not got.renew
    bad = from_connack(0x86, "Bad user name or password")
    assert bad is not None and bad.reason == "bad_username_or_password"
    assert from_connack(0x88, "Server unavailable") is None  # try again or elsewhere


def test_without_a_verifier_every_command_is_refused() -> None:
    verdict = refuse_all(b"{}", NOW)
    assert isinstance(verdict, Refused) and verdict.code == "not_configured"
