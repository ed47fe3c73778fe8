"""hal/systemd.py against a real datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from hal.systemd import (
    JournalFormatter,
    NotifyError,
    journal_priority,
    notify,
    stderr_is_journal,
    watchdog_interval,
)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def test_notify_sends_one_datagram_with_every_field(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    assert notify(
        "READY=1", "STATUS=identity valid, renews in 12 d", environ={"NOTIFY_SOCKET": path}
    )
    assert sock.recv(4096) == b"READY=1\nSTATUS=identity valid, renews in 12 d"


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"devid-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"WATCHDOG=1"


def test_without_systemd_notify_does_nothing_and_a_dead_socket_is_an_error(tmp_path: Path) -> None:
    assert notify("READY=1", environ={}) is False
    with pytest.raises(NotifyError, match=r"cannot notify systemd at .*/gone"):
        notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with pytest.raises(NotifyError, match="neither a path nor an abstract name"):
        notify("READY=1", environ={"NOTIFY_SOCKET": "relative"})


def test_a_reader_that_does_not_read_never_holds_the_sender(
    listener: tuple[socket.socket, str],
) -> None:
    """The kernel queues a few datagrams (net.unix.max_dgram_qlen, 10 by default); past them a
    blocking send would wait for the reader forever: ours fails at once instead."""
    _, path = listener
    env = {"NOTIFY_SOCKET": path}
    sent = 0
    with pytest.raises(NotifyError, match="Resource temporarily unavailable"):
        for sent in range(1, 100_000):
            notify(f"STATUS=message {sent}", environ=env)
    assert sent > 1  # the first ones were queued


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    for value in ("", "0", "x", "²"):
        assert watchdog_interval({"WATCHDOG_USEC": value}) is None


def test_journal_lines_carry_priorities_and_stay_one_line(tmp_path: Path) -> None:
    assert [journal_priority(n) for n in (50, 40, 30, 20, 10, 5)] == [2, 3, 4, 6, 7, 7]
    record = logging.LogRecord("agent", logging.WARNING, "x", 1, "two\nlines %s", ("here",), None)
    assert JournalFormatter("%(message)s").format(record) == "<4>two lines here"
    f = tmp_path / "stderr"
    f.write_text("")
    with open(f) as out:
        st = os.fstat(out.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert stderr_is_journal(env, out.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": "1:2"}, out.fileno())
        assert not stderr_is_journal({}, out.fileno())
