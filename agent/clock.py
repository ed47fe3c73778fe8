"""The only way code reads time: a `Clock` that returns timezone-aware UTC datetimes, monotonic
seconds, and sleeps that an event can interrupt (what the daemon sleeps on between attempts).

`SystemClock` is the real one; `ManualClock` is a deterministic one for tests and simulations:
its time moves only when told, or when someone sleeps or waits on it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Protocol

__all__ = ["Clock", "Interrupt", "ManualClock", "ShiftedClock", "SystemClock"]


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never goes backwards."""
        ...

    def sleep(self, seconds: float) -> None: ...

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Sleep until `event` is set or `timeout` seconds have passed; True if it was set.

        A timeout of 0 or less only looks at the event."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        # A deadline already past gives a negative wait: return at once (time.sleep raises).
        time.sleep(max(0.0, seconds))

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return event.wait(max(0.0, timeout))


class ManualClock:
    """A clock that moves only by `advance`, `sleep` and an unset `wait` (which advances by the
    whole timeout at once). Deterministic: nothing in it depends on real time."""

    def __init__(self, start: datetime, *, monotonic: float = 0.0) -> None:
        if start.tzinfo is None:
            raise ValueError("ManualClock needs a timezone-aware start")
        self._now = start.astimezone(timezone.utc)
        self._monotonic = monotonic
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._monotonic

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go backwards by itself; set a new ManualClock")
        with self._lock:
            self._now += timedelta(seconds=seconds)
            self._monotonic += seconds

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))

    def wait(self, event: threading.Event, timeout: float) -> bool:
        if event.is_set():
            return True
        self.advance(max(0.0, timeout))
        return event.is_set()


class Interrupt:
    """A one-way latch a signal handler may trip: a flag and one byte into a pipe, no lock (an
    `Event.set` in a handler could deadlock on the lock the interrupted code holds). Threads that
    wait on network I/O `select` on `fileno()`, which stays readable once tripped, so the
    service's stop reaches a request that hangs at once (agent/est/transport.py)."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._set = False

    def trip(self) -> None:
        self._set = True
        with contextlib.suppress(OSError):  # full (tripped before) or closed: it stays tripped
            os.write(self._write, b"!")

    def is_set(self) -> bool:
        return self._set

    def fileno(self) -> int:
        return self._read

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


class ShiftedClock(SystemClock):
    """The system clock moved by `offset()` seconds, asked at every reading: a device whose
    clock is wrong (no RTC: 1970 at boot) and is then set (NTP), for tests of the real service
    (agent/wiring.py uses it only when hal.faults' test variable is set)."""

    def __init__(self, offset: Callable[[], float]) -> None:
        self._offset = offset

    def now(self) -> datetime:
        return super().now() + timedelta(seconds=self._offset())
