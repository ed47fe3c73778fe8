"""The control component in-process, driven as the daemon's loop drives it (select on its
descriptors, turns, events) against a Host that records what it is asked: a `renew` held until
its attempt finishes (ok, failed, or at once when the clock is not trustworthy), `reconnect`
emitted as the channel's event, `reload` requested, a refused peer emitted as `peer_refused`.
Real Unix sockets in tmp_path; the real daemon's cases are in tests/test_control_socket.py."""

from __future__ import annotations

import json
import os
import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.clock import SystemClock
from agent.components import Event, EventKind, Snapshot
from agent.control.permission import Policy
from agent.control.server import ControlServer


class FakeHost:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.renewals = 0
        self.reloads = 0

    def snapshot(self) -> Snapshot:
        now = datetime.now(timezone.utc)
        return Snapshot(
            now=now, started_at=now, identity=None, next_action="enroll", next_at=now,
            reason="not enrolled", clock_trusted=True, consecutive_failures=0,
            last_attempt=None, last_success=None, last_error=None, last_disposition=None,
            renewal_requested=False, components={},
        )  # fmt: skip

    def request_renewal(self) -> None:
        self.renewals += 1

    def request_reload(self) -> None:
        self.reloads += 1

    def emit(self, event: Event) -> None:
        self.events.append(event)


class Audit:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def record(self, event: str, fields: dict[str, Any] | None = None) -> bool:
        self.records.append((event, dict(fields or {})))
        return True


@contextmanager
def _dir_fd(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


class Loop:
    """The daemon's select loop around one component, in a thread."""

    def __init__(self, tmp_path: Path, *, service_uid: int) -> None:
        run = tmp_path / "run"
        run.mkdir()
        self.host = FakeHost()
        self.audit = Audit()
        self.server = ControlServer(
            run_dir=run, open_run_dir=lambda: _dir_fd(run),
            policy=Policy(service_uid=service_uid), group=None,
            status=lambda snap: {"status": {}, "text": "t", "code": 0},
            audit=self.audit, request_timeout_seconds=5.0, max_clients=4, clock=SystemClock(),
        )  # fmt: skip
        self.server.start(self.host)  # type: ignore[arg-type]
        self.path = str(self.server.path)
        self.pending: list[Event] = []
        self.lock = threading.Lock()
        self.wake_r, self.wake_w = os.pipe()
        self.done = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done:
            readable, writable = self.server.descriptors()
            r, w, _ = select.select([self.wake_r, *readable], writable, [], 0.5)
            if self.wake_r in r:
                os.read(self.wake_r, 100)
            with self.lock:
                events, self.pending = self.pending, []
            for event in events:
                self.server.on_event(event)
            self.server.turn(datetime.now(timezone.utc), set(r), set(w))

    def give(self, event: Event) -> None:
        with self.lock:
            self.pending.append(event)
        os.write(self.wake_w, b"!")

    def close(self) -> None:
        self.done = True
        os.write(self.wake_w, b"!")
        self.thread.join(10)
        self.server.stop()
        os.close(self.wake_r)
        os.close(self.wake_w)


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Loop]:
    lp = Loop(tmp_path, service_uid=os.geteuid())
    yield lp
    lp.close()


def send(path: str, op: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    s.sendall(json.dumps({"v": 1, "id": op, "op": op}).encode() + b"\n")
    return s


def answer(s: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        assert chunk, "closed without an answer"
        data += chunk
    result: dict[str, Any] = json.loads(data)
    return result


def wait(check: Any) -> None:
    for _ in range(600):
        if check():
            return
        threading.Event().wait(0.05)
    raise AssertionError("condition not reached")


def finished(**detail: Any) -> Event:
    return Event(EventKind.ATTEMPT_FINISHED, datetime.now(timezone.utc), detail)


def test_renew_is_held_until_its_attempt_finishes(loop: Loop) -> None:
    with send(loop.path, "renew") as s:
        wait(lambda: loop.host.renewals == 1)
        loop.give(finished(action="renew", requested=False, ok=True))  # the schedule's own
        with send(loop.path, "ping") as other:  # others are served meanwhile
            assert answer(other)["ok"] is True
        loop.give(finished(action="renew", requested=True, ok=True, disposition="ok"))
        assert answer(s) == {"v": 1, "id": "renew", "ok": True,
                             "result": {"action": "renew", "disposition": "ok"}}  # fmt: skip
    assert loop.audit.records == [("control_command", {"op": "renew", "uid": os.geteuid(),
                                   "pid": os.getpid(), "outcome": "accepted"})]  # fmt: skip


@pytest.mark.parametrize(
    ("disposition", "message"),
    [("retry_later", "EST server unreachable"), ("clock", "not attempted: clock before build")],
)
def test_a_failed_or_refused_attempt_is_the_renews_error(
    loop: Loop, disposition: str, message: str
) -> None:
    with send(loop.path, "renew") as s:
        wait(lambda: loop.host.renewals == 1)
        loop.give(finished(action="renew", requested=True, ok=False,
                           disposition=disposition, message=message))  # fmt: skip
        got = answer(s)
    assert got["ok"] is False
    assert got["error"] == {"code": "attempt_failed", "message": message,
                            "disposition": disposition}  # fmt: skip


def test_reconnect_is_the_channels_event_and_reload_a_request(loop: Loop) -> None:
    with send(loop.path, "reconnect") as s:
        assert answer(s)["result"] == {"requested": True}
    [event] = loop.host.events
    assert (event.kind, event.source) == (EventKind.CHANNEL_RECONNECT_REQUESTED, "control")
    with send(loop.path, "reload") as s:
        assert answer(s)["result"] == {"reloading": True}
    assert loop.host.reloads == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="plays another uid")
def test_a_refused_peer_is_an_event_and_an_audit_record() -> None:
    from tests.support.control import OTHER_UID, as_peer, world

    with world() as base:
        lp = Loop(base, service_uid=os.geteuid())
        try:
            # in the socket's group (ours: root's), so it connects; then judged by its uid
            got = as_peer(OTHER_UID, os.getegid(), [], lambda: answer(send(lp.path, "status")))
            assert got["error"]["code"] == "forbidden", got
            [event] = lp.host.events
            assert (event.kind, event.source) == (EventKind.PEER_REFUSED, "control")
            assert (event.detail["uid"], event.detail["op"]) == (OTHER_UID, "status")
            [(name, fields)] = lp.audit.records
            assert name == "control_peer_refused" and fields["uid"] == OTHER_UID
        finally:
            lp.close()


def test_stop_removes_only_the_socket_it_made(tmp_path: Path) -> None:
    lp = Loop(tmp_path, service_uid=os.geteuid())
    path = Path(lp.path)
    assert path.is_socket()
    lp.close()
    assert not path.exists()


def test_connections_their_peers_closed_do_not_count_against_max_clients(loop: Loop) -> None:
    for i in range(40):  # max_clients is 4: each closed one must be reaped before it counts
        with send(loop.path, "ping") as s:
            assert answer(s)["ok"] is True, i
