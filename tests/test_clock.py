"""`Clock`: the system clock's interruptible wait, and the deterministic ManualClock."""

from __future__ import annotations

import ast
import select
import threading
from datetime import datetime, timedelta, timezone

import pytest

from agent.clock import Clock, Interrupt, ManualClock, ShiftedClock, SystemClock
from tests.conftest import ROOT

T0 = datetime(2026, 6, 1, 8, 0, tzinfo=timezone.utc)


def test_system_clock_is_utc_and_monotonic_does_not_go_back() -> None:
    clock: Clock = SystemClock()
    assert clock.now().tzinfo is timezone.utc
    a = clock.monotonic()
    assert clock.monotonic() >= a


def test_system_wait_returns_when_the_event_is_set_from_another_thread() -> None:
    clock = SystemClock()
    event = threading.Event()
    started = threading.Event()

    def setter() -> None:
        started.wait()
        event.set()

    thread = threading.Thread(target=setter)
    thread.start()
    started.set()
    assert clock.wait(event, 3600) is True  # interrupted: an hour would fail the suite's timeout
    thread.join()


def test_system_wait_without_event_and_past_deadlines() -> None:
    clock = SystemClock()
    event = threading.Event()
    assert clock.wait(event, 0) is False
    assert clock.wait(event, -5) is False  # a deadline already past: at once, no error
    clock.sleep(-1)
    event.set()
    assert clock.wait(event, -5) is True


def test_manual_clock_moves_only_when_told() -> None:
    clock = ManualClock(T0)
    assert clock.now() == T0 and clock.monotonic() == 0.0
    clock.advance(90)
    assert clock.now() == T0 + timedelta(seconds=90) and clock.monotonic() == 90
    clock.sleep(10)
    clock.sleep(-3)
    assert clock.monotonic() == 100
    event = threading.Event()
    assert clock.wait(event, 60) is False and clock.monotonic() == 160
    event.set()
    assert clock.wait(event, 60) is True and clock.monotonic() == 160
    with pytest.raises(ValueError):
        clock.advance(-1)
    with pytest.raises(ValueError):
        ManualClock(datetime(2026, 1, 1))  # naive


def test_only_clock_reads_time_in_agent() -> None:
    """No module of agent/ but clock.py calls time.monotonic/time.time/sleep, datetime.now or
    threading.Timer (est/ included: its transport's deadlines run on the injected clock)."""
    offenders = []
    for path in sorted((ROOT / "agent").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "agent/clock.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                pair = (node.value.id, node.attr)
                if pair in {
                    ("time", "monotonic"),
                    ("time", "time"),
                    ("time", "sleep"),
                    ("datetime", "now"),
                    ("datetime", "utcnow"),
                    ("threading", "Timer"),
                }:
                    offenders.append(f"{rel}:{node.lineno} {pair[0]}.{pair[1]}")
    assert offenders == []


def test_shifted_clock_moves_now_by_the_offset_read_at_every_reading() -> None:
    offset = [-86400.0]
    clock = ShiftedClock(lambda: offset[0])
    before = SystemClock().now()
    shifted = clock.now()
    after = SystemClock().now()
    assert before - timedelta(days=1) <= shifted <= after - timedelta(days=1)
    offset[0] = 0.0  # the clock is set
    assert before <= clock.now() and clock.now().tzinfo is timezone.utc


def test_interrupt_trips_once_and_for_all_and_its_descriptor_says_so() -> None:
    interrupt = Interrupt()
    try:
        assert not interrupt.is_set()
        assert select.select([interrupt.fileno()], [], [], 0)[0] == []
        interrupt.trip()
        interrupt.trip()  # again (a second SIGTERM): no error, still tripped
        assert interrupt.is_set()
        assert select.select([interrupt.fileno()], [], [], 0)[0] == [interrupt.fileno()]
    finally:
        interrupt.close()
