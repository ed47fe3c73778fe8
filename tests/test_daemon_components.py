"""The daemon's component contract (agent/components.py): descriptors waited on, turns, events,
requests and snapshots, and a broken component that does not take the identity down with it.

In-process, with software keys (the tpm2 provider can be loaded once per process; the TPM path
is covered by tests/test_daemon.py's real service), against our real HTTPS EST server."""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.clock import SystemClock
from agent.components import Event, EventKind, Host, Scalar, Snapshot
from agent.config import Config, load_config
from agent.daemon import Daemon
from agent.wiring import build_time, daemon_parts, scheduler_state_store
from tests.support.enroll_env import password_file, write_config
from tests.support.est_server import EstServer

GIVE_UP = timedelta(seconds=90)  # a guard against a loop that never ends, not a timing check


class Recorder:
    """Waits on a socket; a byte on it asks for a renewal; stops the daemon when told."""

    name = "recorder"

    def __init__(self, daemon: list[Daemon], stop_when: Any) -> None:
        self._daemon = daemon
        self._stop_when = stop_when
        self.inside, self.outside = socket.socketpair()
        self.inside.setblocking(False)
        self.host: Host | None = None
        self.events: list[Event] = []
        self.snapshots: list[Snapshot] = []
        self.turns_with_data = 0
        self.stopped = 0
        self.deadline: datetime | None = None

    def start(self, host: Host) -> None:
        self.host = host
        self.deadline = SystemClock().now() + GIVE_UP

    def descriptors(self) -> tuple[Sequence[int], Sequence[int]]:
        return [self.inside.fileno()], []

    def next_turn(self) -> datetime | None:
        return self.deadline

    def turn(self, now: datetime, readable: Collection[int], writable: Collection[int]) -> None:
        assert self.host is not None
        if self.inside.fileno() in readable:
            self.inside.recv(64)
            self.turns_with_data += 1
            self.snapshots.append(self.host.snapshot())
            self.host.request_renewal()
        if self.deadline is not None and now > self.deadline:
            self._daemon[0].stop()
            pytest.fail("the daemon did not get there in time")  # raises: the recorder stops

    def on_event(self, event: Event) -> None:
        self.events.append(event)
        if self._stop_when(self, event):
            self._daemon[0].stop()

    def status(self) -> Mapping[str, Scalar]:
        return {"events": len(self.events)}

    def stop(self) -> None:
        self.stopped += 1
        self.inside.close()
        self.outside.close()


class Broken(Recorder):
    name = "broken"

    def turn(self, now: datetime, readable: Collection[int], writable: Collection[int]) -> None:
        raise ValueError("a bug in a component")


@pytest.fixture
def config(tmp_path: Path, est: EstServer) -> Config:
    path = write_config(
        tmp_path / "config.toml",
        state_dir=tmp_path / "state",
        est=est,
        store="software",
        username="device",
        password_file=str(password_file(tmp_path)),
    )
    return load_config(path)


@pytest.fixture(autouse=True)
def restore_signals() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def run(config: Config, *components: Recorder) -> None:
    holder: list[Daemon] = []
    for c in components:
        c._daemon = holder
    daemon = Daemon(
        load_config=lambda: config,
        build=lambda c: replace(daemon_parts(c), components=components),
        state_store=scheduler_state_store,
        clock=SystemClock(),
        build_time=build_time(),
        notify=lambda *fields: True,
        watchdog_seconds=None,
    )
    holder.append(daemon)
    assert daemon.run() == 0


def kinds(recorder: Recorder) -> list[str]:
    return [e.kind for e in recorder.events]


def requested_renewal_finished(r: Recorder, e: Event) -> bool:
    if e.kind == EventKind.ENROLLED:
        r.outside.send(b"!")  # the daemon now sleeps until the renewal point: wake it
    return e.kind == EventKind.ATTEMPT_FINISHED and e.detail.get("requested") is True


def test_a_component_is_told_of_the_enrollment_and_can_ask_for_a_renewal_through_its_socket(
    config: Config,
) -> None:
    recorder = Recorder([], requested_renewal_finished)
    run(config, recorder)

    assert kinds(recorder) == [
        EventKind.ATTEMPT_STARTED, EventKind.ENROLLED, EventKind.ATTEMPT_FINISHED,
        EventKind.ATTEMPT_STARTED, EventKind.ROTATED, EventKind.ATTEMPT_FINISHED,
    ]  # fmt: skip
    enrolled, rotated_event = recorder.events[1], recorder.events[4]
    assert enrolled.detail["generation"] == 1 and rotated_event.detail["generation"] == 2
    assert enrolled.detail["serial"] != rotated_event.detail["serial"]
    assert recorder.events[3].detail["reason"] == "requested"
    assert recorder.events[5].detail == {
        "action": "renew", "requested": True, "ok": True, "disposition": "ok", "message": "",
    }  # fmt: skip
    assert recorder.turns_with_data == 1
    (seen,) = recorder.snapshots  # taken when the byte arrived, before the renewal
    assert seen.identity is not None and seen.identity.generation == 1
    assert seen.next_action == "renew" and seen.next_at > seen.now
    assert seen.clock_trusted and seen.consecutive_failures == 0 and seen.last_error is None
    assert seen.components == {"recorder": {"events": 3}}
    assert recorder.stopped == 1


def test_a_failing_renewal_is_an_event_with_its_disposition(config: Config, est: EstServer) -> None:
    def finished(r: Recorder, e: Event) -> bool:
        if e.kind == EventKind.ENROLLED:
            est.stop()  # the renewal that follows cannot connect
            r.outside.send(b"!")
        return e.kind == EventKind.ATTEMPT_FINISHED and e.detail.get("requested") is True

    recorder = Recorder([], finished)
    run(config, recorder)

    assert kinds(recorder)[-3:] == [
        EventKind.ATTEMPT_STARTED, EventKind.ROTATION_FAILED, EventKind.ATTEMPT_FINISHED,
    ]  # fmt: skip
    failed = recorder.events[-1].detail
    assert failed["ok"] is False and failed["disposition"] == "retry_later"
    assert "cannot connect to EST server" in str(failed["message"])


def test_a_component_that_raises_is_stopped_and_the_identity_goes_on(
    config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    broken = Broken([], lambda r, e: False)
    broken.outside.send(b"!")  # its first turn has data, and it raises
    recorder = Recorder([], requested_renewal_finished)
    with caplog.at_level(logging.ERROR, logger="agent.daemon"):
        run(config, broken, recorder)

    assert broken.stopped == 1 and recorder.stopped == 1
    assert "broken stopped: turn raised" in caplog.text and "a bug in a component" in caplog.text
    # its first turn came while the enrollment worked (in its own process): it had that
    # attempt's start, then nothing once stopped; the enrollment and the renewal went on
    assert kinds(broken) == [EventKind.ATTEMPT_STARTED]
    assert EventKind.ROTATED in kinds(recorder)
    (seen,) = recorder.snapshots
    assert list(seen.components) == ["recorder"]


def test_a_reload_stops_the_old_components_then_starts_the_new_ones(config: Config) -> None:
    built: list[Recorder] = []
    holder: list[Daemon] = []

    def second_one_reloaded(r: Recorder, e: Event) -> bool:
        if e.kind == EventKind.ATTEMPT_FINISHED and len(built) == 1:
            assert r.host is not None
            r.host.request_reload()
        return e.kind == EventKind.RELOADED

    def build(c: Config) -> Any:
        recorder = Recorder(holder, second_one_reloaded)
        built.append(recorder)
        return replace(daemon_parts(c), components=(recorder,))

    daemon = Daemon(
        load_config=lambda: config, build=build, state_store=scheduler_state_store,
        clock=SystemClock(), build_time=build_time(), notify=lambda *fields: True,
        watchdog_seconds=None,
    )  # fmt: skip
    holder.append(daemon)
    assert daemon.run() == 0

    first, second = built
    assert first.stopped == 1 and second.stopped == 1
    assert EventKind.RELOADED not in kinds(first)  # stopped before the new ones started
    assert kinds(second) == [EventKind.RELOADED]
