"""The control socket's server: a component of the daemon (agent/components.py). I/O.

`paths.run_dir`/control.sock, a non-blocking Unix stream socket, mode 0660 with the service's
group (or `control.readers_group`'s, so its members can connect at all). `run_dir` is reached by
the checked directory walk of hal/secure_dir.py (no symlink on the way, every directory root's or
ours). What is already at the socket's name: a symlink, or anything that is not a socket, or a
socket of another user, is refused (the component stays stopped, the renewal loop goes on); a
socket of ours that nobody answers (a daemon that died) is replaced; one that answers belongs to
another running daemon and is left alone.

Each connection: the peer's credentials from the kernel (SO_PEERCRED, SO_PEERGROUPS or
/proc/<pid>/status), then request lines (agent/control/protocol.py), answered in order. A
connection that does not send a whole request, or does not read its answers, within
`control.request_timeout_seconds` is dropped; at most `control.max_clients` at once (more are
answered "busy"). A refused peer gets an error, an audit entry and a `peer_refused` event, and
is disconnected. `renew` holds its connection until the attempt it asked for finishes (the
daemon's `attempt_finished` with `requested: true`, also sent at once when the clock is not
trustworthy). Never blocks: the loop selects on the listener and the connections.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from agent.clock import Clock
from agent.components import Event, EventKind, Host, Scalar, Snapshot
from agent.control import protocol
from agent.control.permission import Peer, Policy, groups_from_proc_status, refusal
from agent.errors import AgentError, StorageError

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
SOCKET_MODE = 0o660
BACKLOG = 64
#: connections accepted in one turn at most (the rest wait for the next)
ACCEPTS_PER_TURN = 64
#: a response waiting to be read by a peer, at most (a status answer is a few KiB)
MAX_PENDING_OUTPUT = 1024 * 1024
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
MAX_GROUPS = 1024


class Recorder(Protocol):
    def record(self, event: str, fields: dict[str, Any] | None = None) -> bool: ...


#: answers `status`: the service's snapshot in, {"status": ..., "text": ..., "code": ...} out
StatusAnswer = Callable[[Snapshot], dict[str, Any]]


@dataclass
class _Client:
    sock: socket.socket
    peer: Peer
    deadline: float
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytearray = field(default_factory=bytearray)
    #: the id of a `renew` waiting for its attempt (the connection reads nothing meanwhile)
    renew_pending: bool = False
    renew_id: protocol.RequestId = None
    #: close once the outbox is written (an error that ends the connection)
    closing: bool = False

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def open(self) -> bool:
        return self.sock.fileno() >= 0


def peer_of(sock: socket.socket) -> Peer:
    """Who is at the other end, as the kernel says (it recorded it at connect)."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    groups: frozenset[int] | None = None
    with contextlib.suppress(OSError):
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_GROUPS)
        groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    if groups is None:  # older kernels: what /proc says (ProtectProc= may hide other users)
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
                groups = groups_from_proc_status(f.read(64 * 1024))
        except OSError:
            groups = frozenset()
    return Peer(pid=pid, uid=uid, gid=gid, groups=groups)


class ControlServer:
    """The `control` component."""

    name = "control"

    def __init__(
        self,
        *,
        run_dir: Path,
        open_run_dir: Callable[[], AbstractContextManager[int]],
        policy: Policy,
        group: int | None,
        status: StatusAnswer,
        audit: Recorder | None,
        request_timeout_seconds: float,
        max_clients: int,
        clock: Clock,
    ) -> None:
        self.run_dir = run_dir
        self.path = run_dir / SOCKET_NAME
        self._open_run_dir = open_run_dir
        self._policy = policy
        self._group = group
        self._status = status
        self._audit = audit
        self._timeout = request_timeout_seconds
        self._max_clients = max_clients
        self._clock = clock
        self._monotonic = clock.monotonic
        self._host: Host | None = None
        self._listener: socket.socket | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we made
        self._clients: dict[int, _Client] = {}
        self._last_turn = 0.0
        self._served = 0
        self._refused = 0

    # -- the Component protocol ----------------------------------------------------------------

    def start(self, host: Host) -> None:
        self._host = host
        with self._open_run_dir() as dir_fd:  # the checked walk (hal/secure_dir.py)
            self._replace_stale(dir_fd)
            self._listener = self._bind(dir_fd)
        self._last_turn = self._monotonic()
        log.info("control socket %s is listening", self.path)

    def descriptors(self) -> tuple[Sequence[int], Sequence[int]]:
        readable = [self._listener.fileno()] if self._listener is not None else []
        writable = []
        for fd, client in self._clients.items():
            if client.outbox:
                writable.append(fd)
            elif not client.renew_pending and not client.closing:
                readable.append(fd)
        return readable, writable

    def next_turn(self) -> datetime | None:
        deadlines = [c.deadline for c in self._clients.values() if not c.renew_pending]
        if not deadlines or self._host is None:
            return None
        wait = max(0.0, min(deadlines) - self._monotonic())
        return self._host_now() + timedelta(seconds=wait)

    def turn(self, now: datetime, readable: Collection[int], writable: Collection[int]) -> None:
        mono = self._monotonic()
        if mono - self._last_turn > self._timeout:  # the loop was busy (an attempt): not theirs
            for client in self._clients.values():
                client.deadline += mono - self._last_turn
        self._last_turn = mono
        # the connections first: peers that closed are reaped before new ones are counted
        for fd, client in list(self._clients.items()):
            if self._clients.get(fd) is not client:
                continue
            if fd in readable:
                self._read(client, mono)
            if client.outbox and (fd in writable or fd in readable):
                self._flush(client)
        if self._listener is not None and self._listener.fileno() in readable:
            self._accept(mono)
        for client in list(self._clients.values()):
            if client.closing and not client.outbox:
                self._close(client)
            elif not client.renew_pending and mono >= client.deadline:
                log.info("control: dropped a connection from uid %d (timed out)", client.peer.uid)
                self._close(client)

    def on_event(self, event: Event) -> None:
        if event.kind != EventKind.ATTEMPT_FINISHED or not event.detail.get("requested"):
            return
        for client in list(self._clients.values()):
            if not client.renew_pending:
                continue
            client.renew_pending = False
            client.deadline = self._monotonic() + self._timeout
            d = event.detail
            if d.get("ok"):
                result = {"action": d.get("action"), "disposition": "ok"}
                self._send(client, protocol.ok_response(client.renew_id, result))
            else:
                self._send(
                    client,
                    protocol.error_response(
                        client.renew_id,
                        protocol.ATTEMPT_FAILED,
                        str(d.get("message") or "the attempt failed"),
                        disposition=str(d.get("disposition") or ""),
                    ),
                )
            self._process(client)  # requests that came after the renew

    def status(self) -> Mapping[str, Scalar]:
        return {
            "socket": str(self.path),
            "clients": len(self._clients),
            "served": self._served,
            "refused": self._refused,
        }

    def stop(self) -> None:
        for client in list(self._clients.values()):
            self._close(client)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self._unlink_ours()

    # -- the socket file -----------------------------------------------------------------------

    def _replace_stale(self, dir_fd: int) -> None:
        try:
            st = os.stat(SOCKET_NAME, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise StorageError(f"refusing {self.path}: it is a symlink; remove it")
        if not stat.S_ISSOCK(st.st_mode):
            raise StorageError(f"refusing {self.path}: it is not a socket; remove it")
        if st.st_uid != os.geteuid():
            raise StorageError(
                f"refusing {self.path}: it belongs to uid {st.st_uid}, not to this service "
                f"(uid {os.geteuid()})"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("control: replacing the stale socket %s (no one answers it)", self.path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SOCKET_NAME, dir_fd=dir_fd)
            return
        except OSError as e:
            raise StorageError(f"cannot probe {self.path}: {e.strerror or e}") from e
        finally:
            probe.close()
        raise StorageError(f"{self.path} is served by another running devid-agent; not replaced")

    def _bind(self, dir_fd: int) -> socket.socket:
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            old = os.umask(0o777 & ~SOCKET_MODE)  # the file is made with its final mode
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
            st = os.stat(SOCKET_NAME, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
                raise StorageError(f"{self.path} changed while it was made; refusing it")
            self._bound = (st.st_dev, st.st_ino)
            if self._group is not None and st.st_gid != self._group:
                os.chown(SOCKET_NAME, -1, self._group, dir_fd=dir_fd, follow_symlinks=False)
            sock.listen(BACKLOG)
        except OSError as e:
            sock.close()
            raise StorageError(f"cannot serve {self.path}: {e.strerror or e}") from e
        except BaseException:
            sock.close()
            raise
        return sock

    def _unlink_ours(self) -> None:
        """Remove the socket file if it is still the one we made."""
        if self._bound is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._bound:
                os.unlink(self.path)
        self._bound = None

    # -- connections ---------------------------------------------------------------------------

    def _accept(self, mono: float) -> None:
        assert self._listener is not None
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: try again next turn
                log.warning("control: cannot accept a connection: %s", e.strerror or e)
                return
            sock.setblocking(False)
            try:
                peer = peer_of(sock)
            except OSError as e:
                log.warning("control: no credentials for a connection (%s); closed", e)
                sock.close()
                continue
            client = _Client(sock=sock, peer=peer, deadline=mono + self._timeout)
            if len(self._clients) >= self._max_clients:
                self._reap_closed()
            if len(self._clients) >= self._max_clients:
                message = f"busy: {self._max_clients} connections already; try again"
                self._send(client, protocol.error_response(None, protocol.BUSY, message))
                sock.close()
                continue
            self._clients[sock.fileno()] = client

    def _reap_closed(self) -> None:
        """Close the connections whose peers have gone (EOF waiting, nothing left to say)."""
        for client in list(self._clients.values()):
            if client.outbox or client.renew_pending:
                continue
            try:
                if client.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    self._close(client)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                self._close(client)

    def _read(self, client: _Client, mono: float) -> None:
        try:
            data = client.sock.recv(protocol.MAX_REQUEST_BYTES + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(client)
            return
        if not data:  # the peer closed its end
            if not client.outbox:
                self._close(client)
            else:
                client.closing = True
            return
        client.inbox += data
        self._process(client)

    def _process(self, client: _Client) -> None:
        """Answer each whole request line in the inbox, in order."""
        while not client.renew_pending and not client.closing and client.open:
            line_end = client.inbox.find(b"\n")
            if line_end < 0:
                if len(client.inbox) > protocol.MAX_REQUEST_BYTES:
                    too_long = f"request longer than {protocol.MAX_REQUEST_BYTES} bytes"
                    self._reject(client, None, protocol.TOO_LARGE, too_long)
                return
            line = bytes(client.inbox[: line_end + 1])
            del client.inbox[: line_end + 1]
            try:
                request = protocol.parse_request(line)
            except protocol.ProtocolError as e:
                self._reject(client, e.request_id, e.code, str(e))
                return
            self._answer(client, request)
            client.deadline = self._monotonic() + self._timeout

    def _answer(self, client: _Client, request: protocol.Request) -> None:
        assert self._host is not None
        peer = client.peer
        why = refusal(self._policy, peer, request.op)
        if why is not None:
            self._refused += 1
            log.warning("control: refused %s from pid %d uid %d: %s",
                        request.op, peer.pid, peer.uid, why)  # fmt: skip
            fields: dict[str, Scalar] = {
                "op": request.op, "uid": peer.uid, "gid": peer.gid, "pid": peer.pid,
            }  # fmt: skip
            if self._audit is not None:
                self._audit.record("control_peer_refused", {**fields, "outcome": "refused"})
            self._host.emit(Event(EventKind.PEER_REFUSED, self._host_now(), fields, self.name))
            self._reject(client, request.id, protocol.FORBIDDEN, why)
            return
        self._served += 1
        if request.op in protocol.ACTING and self._audit is not None:
            self._audit.record(
                "control_command",
                {"op": request.op, "uid": peer.uid, "pid": peer.pid, "outcome": "accepted"},
            )
        try:
            result = self._result(client, request)
        except AgentError as e:
            self._send(client, protocol.error_response(request.id, protocol.UNAVAILABLE, str(e)))
            return
        if result is not None:
            self._send(client, protocol.ok_response(request.id, result))

    def _result(self, client: _Client, request: protocol.Request) -> dict[str, Any] | None:
        assert self._host is not None
        op = request.op
        if op == "ping":
            from agent import __version__

            return {"pong": True, "version": __version__}
        if op == "status":
            return self._status(self._host.snapshot())
        if op == "renew":
            client.renew_pending = True
            client.renew_id = request.id
            self._host.request_renewal()
            return None  # answered when the attempt finishes (on_event)
        if op == "reload":
            self._host.request_reload()
            return {"reloading": True}
        if op == "reconnect":
            event = Event(EventKind.CHANNEL_RECONNECT_REQUESTED, self._host_now(), {}, self.name)
            self._host.emit(event)
            return {"requested": True}
        # parse_request admits only OPS
        raise protocol.ProtocolError(protocol.UNKNOWN_OP, f"op {op} is not served")

    def _reject(self, client: _Client, request_id: protocol.RequestId, code: str, msg: str) -> None:
        client.inbox.clear()
        self._send(client, protocol.error_response(request_id, code, msg))
        client.closing = True

    def _send(self, client: _Client, data: bytes) -> None:
        if len(client.outbox) + len(data) > MAX_PENDING_OUTPUT:
            self._close(client)  # it does not read its answers
            return
        client.outbox += data
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        if client.sock.fileno() < 0:
            return
        try:
            sent = client.sock.send(client.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EPIPE, ECONNRESET: the peer went away
            client.outbox.clear()
            client.closing = True
            return
        del client.outbox[:sent]

    def _close(self, client: _Client) -> None:
        for fd, held in list(self._clients.items()):
            if held is client:
                del self._clients[fd]
        with contextlib.suppress(OSError):
            client.sock.close()

    def _host_now(self) -> datetime:
        return self._clock.now()
