"""The channel's pure parts: topics, messages, reconnect delays with full jitter and failover,
the offline queue, what a broker's refusal means."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone

import pytest

from agent.components import Event
from agent.mqtt import messages
from agent.mqtt.backoff import ReconnectPlan, ReconnectPolicy
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


def test_full_jitter_between_the_bounds_with_a_doubling_cap() -> None:
    policy = ReconnectPolicy(1.0, 60.0)
    rng = random.Random(7)
    assert [policy.cap(n) for n in (1, 2, 3, 5, 6, 100)] == [2, 4, 8, 32, 60, 60]
    for failures in range(1, 12):
        draws = [policy.delay(failures, rng) for _ in range(500)]
        assert all(1.0 <= d <= policy.cap(failures) for d in draws)
        if policy.cap(failures) >= 8:  # spread over the whole range, not bunched at the cap
            assert min(draws) < 1.0 + policy.cap(failures) * 0.1
            assert max(draws) > policy.cap(failures) * 0.9
    a = [ReconnectPolicy(1, 60).delay(3, random.Random(1)) for _ in range(3)]
    assert len(set(a)) == 1  # seeded: deterministic


def test_failover_in_order_then_a_jittered_round() -> None:
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
    plan.connected()
    assert plan.due(NOW) and plan.failures == 0
    plan.lost(NOW)  # spread wide at once: 1 .. 16 x min
    assert plan.at is not None and plan.at <= NOW + timedelta(seconds=10)
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
