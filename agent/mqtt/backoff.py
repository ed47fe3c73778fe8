"""When to connect next, and to which broker (pure; the random source is injected).

A round tries the brokers in the configured order, each at once after the previous failed
(failover). Rounds without a connection follow the device's **phase grid**: when the time
without a connection begins (a connection lost, or the first failed attempt), the plan draws
one phase u, uniform in [0, 1), and the rounds fall at `since + offset(k + u)`, k = 0, 1, 2...
`offset` (a `Schedule`) starts at the lower bound, spans a first window (up to 16 x min after a
lost connection: 1-16 s at the defaults; up to 2 x min after a failed start), and from there its
step doubles per round up to the upper bound, at which it runs on in steps of the upper bound.

Why a grid rather than drawing each delay afresh (full jitter): wherever in its outage the
broker comes back, at time T, each device's next round is the first of its points after T; with
the phases uniform over the fleet, those points are uniform in offset's coordinate over one
step, so the returns spread over one step after T at a density that varies at most 2x (the
step's growth) across it: busiest / mean <= 1 / ln 2 = 1.44 before sampling noise, for a broker
down 1 s as for one down an hour. Delays drawn afresh from each failure leave the fleet at
different doubling levels, with a long tail. A broker that stays down is still backed off: the
steps reach the upper bound, one round per `max_seconds` per device, the fleet spread over it.

Each delay, counted from the failure, stays within [min, max]: the next point at least `min`
after the failure (an attempt that took long skips the points it ran over), and never more than
`max` (where the grid would wait longer, as after an attempt that ran over a whole step).

A connection lost within `max_seconds` of its start (a broker that accepts and drops us, a
client id that another client takes over) does not start a new grid: the rounds go on along the
old one, so such a broker too is backed off to one round per `max_seconds`.

After a refusal (the broker refused our identity, or our check refused the broker: a security
event) the delay is drawn in [max / 2, max] (never below min): never retried at the lower bound;
the grid stays.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = ["LOST_SPREAD", "START_SPREAD", "ReconnectPlan", "ReconnectPolicy", "Schedule"]

#: after a lost connection the first round falls in [min, min x this] (capped at max)
LOST_SPREAD = 16.0
#: after a failed attempt while not connected (at start, after a refusal): [min, min x this]
START_SPREAD = 2.0


@dataclass(frozen=True)
class Schedule:
    """The offsets (seconds after the time without a connection began) of one device's rounds:
    round k of phase u at `offset(k + u)`. offset(0) = `low`; its rate starts at `first x ln 2`
    (so offset(1) - offset(0) = `first` while uncapped), doubles per unit and stops at `high`:
    each step, offset(x + 1) - offset(x), grows with x and never exceeds `high`."""

    low: float
    first: float
    high: float

    def __post_init__(self) -> None:
        if not (self.low > 0 and self.first >= 0 and self.high > 0):
            raise ValueError("schedule: 0 < low, 0 <= first, 0 < high")

    @property
    def _rate(self) -> float:
        return self.first * math.log(2)

    @property
    def _knee(self) -> float:
        """The x from which the rate is `high` (0: from the start)."""
        return math.log2(self.high / self._rate) if 0 < self._rate < self.high else 0.0

    def _at_knee(self) -> float:
        return self.low + (self.high - self._rate) / math.log(2) if self._knee > 0 else self.low

    def offset(self, x: float) -> float:
        if x <= 0:
            return self.low
        knee = self._knee
        if x <= knee:
            return self.low + self.first * (math.pow(2.0, x) - 1.0)
        return self._at_knee() + self.high * (x - knee)

    def position(self, t: float) -> float:
        """The inverse of `offset`: the x at which it reaches `t` (0 at or before `low`)."""
        if t <= self.low:
            return 0.0
        knee, at_knee = self._knee, self._at_knee()
        if t <= at_knee:
            return math.log2(1.0 + (t - self.low) / self.first)
        return knee + (t - at_knee) / self.high

    def next_point(self, t: float, phase: float) -> float:
        """The first offset of phase `phase` at or after `t`."""
        k = max(0, math.ceil(self.position(t) - phase))
        while self.offset(k + phase) < t:  # rounding in position()
            k += 1
        return self.offset(k + phase)


@dataclass(frozen=True)
class ReconnectPolicy:
    min_seconds: float
    max_seconds: float

    def __post_init__(self) -> None:
        if not 0 < self.min_seconds <= self.max_seconds:
            raise ValueError("reconnect bounds: 0 < min <= max")

    def schedule(self, spread: float) -> Schedule:
        """The grid whose first window is [min, min x spread], kept within [min, max]."""
        first = min(self.min_seconds * (spread - 1), self.max_seconds - self.min_seconds)
        return Schedule(self.min_seconds, max(first, 0.0), self.max_seconds)

    def bounded(self, seconds: float) -> float:
        return min(max(seconds, self.min_seconds), self.max_seconds)

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
        #: the time without a connection: when it began, its grid, this device's phase on it
        self.since: datetime | None = None
        self.schedule: Schedule | None = None
        self.phase = 0.0
        self._connected_at: datetime | None = None  # the grid's last connection

    def due(self, now: datetime) -> bool:
        return self.at is None or self.at <= now

    def connected(self, now: datetime) -> None:
        """The broker accepted us: the grid is kept until the connection has held `max_seconds`
        (lost before, the rounds go on along it)."""
        self.index, self.failures, self.at = 0, 0, None
        self._connected_at = now

    def failed(self, now: datetime, *, slow: bool = False) -> None:
        """The attempt to broker `index` failed: the next broker at once, or (after the last one,
        or with `slow`: the broker refused our identity, or we refused the broker) a new round,
        at this device's next point on its grid at least `min` from now (with `slow`, in the
        upper half of the upper bound: retrying soon would be refused the same way)."""
        if not slow and self.index + 1 < self._brokers:
            self.index += 1
            self.at = now
            return
        self.failures += 1
        self.index = 0
        if self._ended(now):
            self._begin(now, START_SPREAD)
        if slow:
            self.at = now + timedelta(seconds=self.policy.slow_delay(self._rng))
        else:
            self.at = self._next(now)

    def lost(self, now: datetime) -> None:
        """A connection ended without our asking: the first broker again, in a window spread
        wide enough that a fleet which lost its broker together does not come back together,
        then on a new grid from now; a connection that did not hold `max_seconds`: the next point
        on the grid it was made on."""
        self.index = 0
        if self._ended(now):
            self._begin(now, LOST_SPREAD)
        self.at = self._next(now)

    def now(self, now: datetime) -> None:
        """Connect at once (a new identity, a requested reconnect); the grid stays."""
        self.index = 0
        self.at = now

    def _ended(self, now: datetime) -> bool:
        """No grid, or the last connection made on it held: the next failure starts a new one."""
        if self.since is None or self._connected_at is None:
            return self.since is None
        return now - self._connected_at >= timedelta(seconds=self.policy.max_seconds)

    def _begin(self, now: datetime, spread: float) -> None:
        self._connected_at = None
        self.since = now
        self.schedule = self.policy.schedule(spread)
        self.phase = self._rng.random()

    def _next(self, now: datetime) -> datetime:
        assert self.since is not None and self.schedule is not None
        elapsed = (now - self.since).total_seconds()
        point = self.schedule.next_point(elapsed + self.policy.min_seconds, self.phase)
        return now + timedelta(seconds=self.policy.bounded(point - elapsed))
