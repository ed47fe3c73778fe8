"""When to connect next, and to which broker (pure; the random source is injected).

A round tries the brokers in the configured order, each at once after the previous failed
(failover). After a round in which none answered, or after a connection was lost, the next
round waits a delay drawn with FULL jitter, uniformly between the lower bound and a cap that
doubles with each failed round up to the upper bound (AWS's "full jitter", kept above the
lower bound). A fleet that lost its broker at the same instant comes back spread over the cap,
not in the same second as paho's own doubling without jitter would bring it: after a lost
connection the first draw already spans [min, min(max, 16 x min)] (1-16 s at the defaults),
and the rounds after it continue from there. After a refusal (the broker refused our identity,
or our check refused the broker: a security event) the delay is drawn in [max / 2, max]: never
retried at the lower bound.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = ["ReconnectPlan", "ReconnectPolicy"]

#: 2 ** this is far past any upper bound: no float overflow however long a device stays offline
_MAX_EXPONENT = 40
#: after a lost connection, the first draw's cap is min x 2 ** this (a fleet spreads out at once)
LOST_EXPONENT = 4


@dataclass(frozen=True)
class ReconnectPolicy:
    min_seconds: float
    max_seconds: float

    def __post_init__(self) -> None:
        if not 0 < self.min_seconds <= self.max_seconds:
            raise ValueError("reconnect bounds: 0 < min <= max")

    def cap(self, failures: int) -> float:
        """The upper end of the draw after `failures` (>= 1) rounds without a connection."""
        exponent = min(max(failures, 1), _MAX_EXPONENT)
        return min(self.max_seconds, self.min_seconds * 2.0**exponent)

    def delay(self, failures: int, rng: random.Random) -> float:
        return rng.uniform(self.min_seconds, self.cap(failures))

    def slow_delay(self, rng: random.Random) -> float:
        """After a refusal (of us, or of the broker by us): at the upper bound, jittered over
        its upper half, never soon: [max / 2, max] (and never below the lower bound)."""
        return rng.uniform(max(self.min_seconds, self.max_seconds / 2), self.max_seconds)


class ReconnectPlan:
    """Which broker next and when: `failed()` after an attempt that did not connect, `lost()`
    after a connection ended, `connected()` once the broker accepted us."""

    def __init__(self, brokers: int, policy: ReconnectPolicy, rng: random.Random) -> None:
        if brokers < 1:
            raise ValueError("at least one broker")
        self._brokers = brokers
        self.policy = policy
        self._rng = rng
        self.index = 0  # the broker the next attempt goes to
        self.failures = 0  # rounds in a row in which no broker accepted us
        self.at: datetime | None = None  # None: at once

    def due(self, now: datetime) -> bool:
        return self.at is None or self.at <= now

    def connected(self) -> None:
        self.index, self.failures, self.at = 0, 0, None

    def failed(self, now: datetime, *, slow: bool = False) -> None:
        """The attempt to broker `index` failed: the next broker at once, or (after the last one,
        or with `slow`: the broker refused our identity, or we refused the broker) a new round
        after a jittered delay (with `slow`, in the upper half of the upper bound: retrying soon
        would be refused the same way)."""
        if not slow and self.index + 1 < self._brokers:
            self.index += 1
            self.at = now
            return
        self.failures += 1
        self.index = 0
        delay = (
            self.policy.slow_delay(self._rng)
            if slow
            else self.policy.delay(self.failures, self._rng)
        )
        self.at = now + timedelta(seconds=delay)

    def lost(self, now: datetime) -> None:
        """A connection ended without our asking: the first broker again, after a draw spread
        wide enough that a fleet which lost its broker together does not come back together."""
        self.index = 0
        self.failures = LOST_EXPONENT
        self.at = now + timedelta(seconds=self.policy.delay(LOST_EXPONENT, self._rng))

    def now(self, now: datetime) -> None:
        """Connect at once (a new identity, a requested reconnect)."""
        self.index = 0
        self.at = now
