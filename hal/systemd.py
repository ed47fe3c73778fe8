"""systemd's notify protocol and journal priorities, without a dependency.

`notify("READY=1")` sends one datagram to `$NOTIFY_SOCKET` (a path, or `@name` for the abstract
namespace), as sd_notify(3) does; without the variable it does nothing, so the service also runs
outside systemd. Failures are reported to the caller (the `sdnotify` package swallows them):
a watchdog ping that cannot be sent must not pass unnoticed.

`watchdog_interval()` reads `$WATCHDOG_USEC` (for this PID, `$WATCHDOG_PID`) and returns half of
it, the interval sd_watchdog_enabled(3) recommends for pings.

`JournalFormatter` prefixes each log line with `<N>` (sd-daemon(3) priorities) when stderr is
the journal (`$JOURNAL_STREAM` names stderr's device and inode), so levels survive.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["JournalFormatter", "NotifyError", "notify", "stderr_is_journal", "watchdog_interval"]


class NotifyError(OSError):
    """A notification could not be sent to systemd."""


def notify(*fields: str, environ: dict[str, str] | None = None) -> bool:
    """Send `fields` ("READY=1", "STATUS=...") as one message; False when not under systemd."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address[0] not in "/@":
        raise NotifyError(f"NOTIFY_SOCKET {address!r} is neither a path nor an abstract name")
    target = "\0" + address[1:] if address[0] == "@" else address
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            # never wait: a reader that does not read (its queue is 10 datagrams by default)
            # must not hold the service's loop, its stop included; the message is dropped
            sock.send(message, socket.MSG_DONTWAIT)
    except OSError as e:
        raise NotifyError(f"cannot notify systemd at {address}: {e.strerror or e}") from e
    return True


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of WatchdogSec), or None when there is no watchdog."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not (usec.isascii() and usec.isdigit()) or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (a parent that exec'd us keeps its own)
    return int(usec) / 2e6


#: sd-daemon(3): <2> crit, <3> err, <4> warning, <6> info, <7> debug; highest level first
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def journal_priority(levelno: int) -> int:
    return next((p for level, p in _PRIORITIES if levelno >= level), 7)


def stderr_is_journal(environ: dict[str, str] | None = None, stderr_fd: int = 2) -> bool:
    env = os.environ if environ is None else environ
    device, _, inode = env.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stderr_fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


class JournalFormatter(logging.Formatter):
    """One line per record, `<N>` first, newlines folded (a line is an event in the journal)."""

    def format(self, record: logging.LogRecord) -> str:
        text = " ".join(super().format(record).split("\n"))
        return f"<{journal_priority(record.levelno)}>{text}"
