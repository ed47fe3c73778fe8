"""Firmware news for the service: installs, commits and rollbacks, as events.

Firmware is installed, committed and rolled back by root's one-shot commands (OTA hooks, the
mark-good unit), never by the service, which may not touch root's state. What the service can
read is the status snapshot root leaves after each of them (agent/wiring.firmware_status). This
component reads it every `interval_seconds` and turns each change into an event (the MQTT events
topic carries it). The comparison is pure (`changes`). The last reading is kept in the service's
state directory, so a commit made at boot by the mark-good unit, before the service started, is
still reported once; without a kept reading the first one is the baseline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime, timedelta

from agent.clock import Clock
from agent.components import Event, EventKind, Host, Scalar
from agent.errors import AgentError
from agent.firmware.status import FirmwareStatus, SlotStatus

log = logging.getLogger(__name__)

__all__ = ["FirmwareWatch", "changes"]


def _slot(status: FirmwareStatus, name: str | None) -> SlotStatus | None:
    return next((s for s in status.slots if s.name == name), None)


def _about(slot: SlotStatus | None, name: str | None) -> dict[str, Scalar]:
    if slot is None:
        return {"slot": name}
    return {"slot": slot.name, "version": slot.version, "security_version": slot.security_version}


def changes(old: FirmwareStatus, new: FirmwareStatus) -> list[tuple[str, dict[str, Scalar]]]:
    """The events between two readings, in the order they must have happened."""
    found: list[tuple[str, dict[str, Scalar]]] = []
    if new.pending is not None and new.pending != old.pending:
        found.append((EventKind.FIRMWARE_INSTALLED, _about(_slot(new, new.pending), new.pending)))
    if new.fell_back and not old.fell_back:
        back: dict[str, Scalar] = {"booted": new.booted, "failed": old.pending}
        found.append((EventKind.FIRMWARE_ROLLED_BACK, back))
    committed = new.committed_security_version > old.committed_security_version or (
        old.pending is not None and new.pending is None and new.booted == old.pending
    )
    if committed and not new.fell_back:
        detail = _about(_slot(new, new.booted), new.booted)
        detail["committed_security_version"] = new.committed_security_version
        found.append((EventKind.FIRMWARE_COMMITTED, detail))
    return found


class FirmwareWatch:
    name = "firmware"

    def __init__(
        self,
        *,
        read: Callable[[], FirmwareStatus],
        recall: Callable[[], FirmwareStatus | None],
        remember: Callable[[FirmwareStatus], None],
        clock: Clock,
        interval_seconds: float,
    ) -> None:
        self._read = read
        self._recall = recall
        self._remember = remember
        self._clock = clock
        self._interval = timedelta(seconds=interval_seconds)
        self._host: Host | None = None
        self._last: FirmwareStatus | None = None
        self._next = clock.now()
        self._error: str | None = None

    def start(self, host: Host) -> None:
        self._host = host
        try:
            self._last = self._recall()
        except AgentError as e:  # a damaged record: start from the next reading
            log.warning("the last firmware status seen cannot be read (%s): starting afresh", e)

    def descriptors(self) -> tuple[Sequence[int], Sequence[int]]:
        return (), ()

    def next_turn(self) -> datetime | None:
        return self._next

    def turn(self, now: datetime, readable: Collection[int], writable: Collection[int]) -> None:
        if now < self._next:
            return
        self._next = now + self._interval
        try:
            status = self._read()
        except AgentError as e:  # no snapshot yet, or a damaged one: say so once, keep watching
            if str(e) != self._error:
                log.warning("firmware status cannot be read: %s", e)
            self._error = str(e)
            return
        self._error = None
        if status == self._last:
            return
        if self._last is not None and self._host is not None:
            for kind, detail in changes(self._last, status):
                log.info("firmware: %s %s", kind, detail)
                self._host.emit(Event(kind=kind, at=now, detail=detail, source=self.name))
        self._last = status
        try:
            self._remember(status)
        except AgentError as e:  # reported again at the next change; the events went out
            log.warning("the firmware status seen cannot be kept: %s", e)

    def on_event(self, event: Event) -> None:
        pass

    def status(self) -> Mapping[str, Scalar]:
        last = self._last
        return {
            "booted": None if last is None else last.booted,
            "pending": None if last is None else last.pending,
            "committed_security_version": None if last is None else last.committed_security_version,
            "error": self._error,
        }

    def stop(self) -> None:
        pass
