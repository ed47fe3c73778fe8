"""The bounded offline queue of events (pure).

An event stays queued until the broker acknowledges it (PUBACK for QoS 1), so a connection
that drops, a hot swap or a reconnect loses none: what was sent and not acknowledged is sent
again on the next connection (at least once; each carries a `seq`). When the queue is full the
oldest event is dropped and counted; the count goes out with the next event first sent.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from agent.components import Event

__all__ = ["EventQueue", "Queued"]


@dataclass
class Queued:
    seq: int
    event: Event
    #: the packet id while in flight on the current connection
    mid: int | None = None
    #: events dropped just before this one (fixed when it is first sent)
    dropped_before: int | None = None


class EventQueue:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._items: deque[Queued] = deque()
        self._seq = 0
        self.dropped_total = 0
        self._dropped_unreported = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, event: Event) -> Queued:
        while len(self._items) >= self.capacity:
            self._items.popleft()
            self.dropped_total += 1
            self._dropped_unreported += 1
        self._seq += 1
        item = Queued(self._seq, event)
        self._items.append(item)
        return item

    def unsent(self) -> list[Queued]:
        return [item for item in self._items if item.mid is None]

    def drops_for(self, item: Queued) -> int:
        """The drops `item` reports: fixed the first time it is sent, so a resend says the same."""
        if item.dropped_before is None:
            item.dropped_before = self._dropped_unreported
            self._dropped_unreported = 0
        return item.dropped_before

    def sending(self, item: Queued, mid: int) -> None:
        """`item` went out as packet `mid`."""
        item.mid = mid

    def acknowledged(self, mid: int) -> bool:
        for item in self._items:
            if item.mid == mid:
                self._items.remove(item)
                return True
        return False

    def connection_ended(self) -> None:
        """Nothing is in flight any more: what was not acknowledged goes again."""
        for item in self._items:
            item.mid = None
