"""The metrics textfile written by the service (a component, agent/components.py).

At the turn after every `attempt_finished`, and every `metrics.interval_seconds`, the file
`metrics.textfile` is replaced atomically (0644) with what `devid-agent metrics write` writes
(the disk status: identity, trust anchor and CA set expiry, firmware, build info) plus what only
the running service knows, from its snapshot and its events: the next renewal, renewal attempts
and failures by disposition, the channel connected, commands refused, CA refreshes and changes.

The counters are counted from events since this start and begin at zero after a restart (the
Prometheus convention for counters; `devid_agent_service_start_time_seconds` marks the reset).
A write that fails is logged and tried again at the next interval: metrics never stop the
service.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path

from agent.clock import Clock
from agent.components import Event, EventKind, Host, Scalar
from agent.errors import AgentError
from agent.metrics import RenewalFacts, ServiceCounters, render
from agent.status import AgentStatus

log = logging.getLogger(__name__)


class MetricsWriter:
    name = "metrics"

    def __init__(
        self,
        *,
        path: Path,
        interval_seconds: float,
        collect: Callable[[], AgentStatus],
        write: Callable[[Path, bytes], None],
        clock: Clock,
    ) -> None:
        self._path = path
        self._interval = timedelta(seconds=interval_seconds)
        self._collect = collect
        self._write = write
        self._clock = clock
        self._host: Host | None = None
        self._counters = ServiceCounters()
        self._next: datetime | None = None
        self._writes = 0
        self._last_error: str | None = None

    def start(self, host: Host) -> None:
        self._host = host
        self._next = self._clock.now()  # at the first turn: the snapshot exists by then

    def descriptors(self) -> tuple[Sequence[int], Sequence[int]]:
        return (), ()

    def next_turn(self) -> datetime | None:
        return self._next

    def turn(self, now: datetime, readable: Collection[int], writable: Collection[int]) -> None:
        if self._next is not None and now >= self._next:
            self.write()

    def on_event(self, event: Event) -> None:
        c = self._counters
        d = event.detail
        if event.kind == EventKind.ATTEMPT_FINISHED:
            action = str(d.get("action", ""))
            disposition = str(d.get("disposition", ""))
            key = (action, disposition)
            c.attempts[key] = c.attempts.get(key, 0) + 1
            if not d.get("ok"):
                c.failures[key] = c.failures.get(key, 0) + 1
            # at the next turn: by then the daemon has decided again, so the snapshot has the
            # attempt's outcome and the next renewal (it is taken before the attempt until then)
            self._next = self._clock.now()
        elif event.kind == EventKind.COMMAND_REFUSED:
            c.commands_refused += 1
        elif event.kind == EventKind.CA_REFRESHED:
            result = str(d.get("result", ""))
            c.ca_refreshes[result] = c.ca_refreshes.get(result, 0) + 1
        elif event.kind == EventKind.CA_CHANGED:
            c.ca_changes += 1

    def status(self) -> Mapping[str, Scalar]:
        return {"textfile": str(self._path), "writes": self._writes, "last_error": self._last_error}

    def stop(self) -> None:
        self._host = None

    def write(self) -> None:
        now = self._clock.now()
        self._next = now + self._interval
        if self._host is None:
            return
        try:
            snapshot = self._host.snapshot()
        except RuntimeError:  # before the daemon's first turn: at the next one
            return
        facts = RenewalFacts(
            last_success=snapshot.last_success,
            last_attempt=snapshot.last_attempt,
            consecutive_failures=snapshot.consecutive_failures,
        )
        try:
            text = render(self._collect(), facts, now, (snapshot, self._counters))
            self._write(self._path, text.encode())
        except AgentError as e:
            if self._last_error != str(e):
                log.warning("metrics: cannot write %s: %s", self._path, e)
            self._last_error = str(e)
            return
        self._writes += 1
        self._last_error = None
