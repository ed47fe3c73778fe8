"""A fleet on a simulated clock: the real renewal policy (agent/renewal.py), no network.

10,000 devices enrolled in the same minute with 30-day certificates go through three renewal
cycles; each attempt fails with probability 5% (seeded; the seed is printed). Printed, never
asserted: the peak-minute and peak-hour request counts against their means over each cycle's
active span (goal: peak minute / mean <= 2x), the share of renewals before 80% of the lifetime
(goal >= 99.9%), and the share of devices that ever held an expired certificate (goal 0).

At this fleet size a cycle's mean is under two requests a minute, so the per-minute peak is
set by chance (Poisson), not by the policy: the reference rows show what an ideal uniform
random spread over the same window gives in the same run. The other references: kubelet's rule
(a uniform point in 70-90% of the lifetime, drawn afresh at every restart) and a naive fixed
point (2/3 of the lifetime, step's rule without its jitter), with the same failures and a fixed
60 s retry.

Run: .venv/bin/python bench/bench_fleet.py [--devices 10000] [--seed N]
"""

from __future__ import annotations

import argparse
import collections
import heapq
import random
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.renewal import Action, CertFacts, Failure, History, RenewalPolicy, decide  # noqa: E402

LIFETIME = timedelta(days=30)
CYCLES = 3
FAIL = 0.05
T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
FLOOR = T0 - timedelta(days=1)  # the build time: before every simulated moment

Scheduler = Callable[[str, CertFacts, History, datetime], datetime]


def ours(policy: RenewalPolicy) -> Scheduler:
    def when(device: str, cert: CertFacts, history: History, now: datetime) -> datetime:
        decision = decide(cert=cert, device_id=device, history=history, now=now,
                          clock_floor=FLOOR, bootstrap_available=True, policy=policy)  # fmt: skip
        assert decision.action is Action.RENEW, decision  # the simulated clock is believed
        return decision.at

    return when


def fixed_share(low: float, high: float, rng: random.Random) -> Scheduler:
    def when(device: str, cert: CertFacts, history: History, now: datetime) -> datetime:
        if history.failures and history.last_attempt is not None:
            return history.last_attempt + timedelta(seconds=60)
        return cert.not_before + LIFETIME * rng.uniform(low, high)

    return when


def simulate(devices: int, when: Scheduler, rng: random.Random) -> dict[str, float]:
    queue: list[tuple[datetime, int]] = []
    state: dict[int, tuple[CertFacts, History, int]] = {}
    for d in range(devices):
        nb = T0 + timedelta(seconds=rng.uniform(0, 60)) - timedelta(seconds=60)
        cert = CertFacts(nb, nb + LIFETIME, rng.getrandbits(64))
        state[d] = (cert, History(), 0)
        heapq.heappush(queue, (when(f"gw-{d}", cert, History(), nb), d))
    per_cycle: list[collections.Counter[int]] = [collections.Counter() for _ in range(CYCLES)]
    early = renewed = 0
    expired: set[int] = set()
    while queue:
        at, d = heapq.heappop(queue)
        cert, history, cycle = state[d]
        at = max(at, history.last_attempt or at)
        per_cycle[cycle][int((at - T0).total_seconds() // 60)] += 1
        if at >= cert.not_after:
            expired.add(d)
        if rng.random() < FAIL:
            history = History(failures=history.failures + 1, last_failure=Failure.RETRYABLE,
                              last_attempt=at)  # fmt: skip
        else:
            renewed += 1
            early += (at - cert.not_before) < LIFETIME * 0.8
            nb = at - timedelta(seconds=60)
            cert, history, cycle = (
                CertFacts(nb, nb + LIFETIME, rng.getrandbits(64)),
                History(),
                cycle + 1,
            )
        state[d] = (cert, history, cycle)
        if cycle < CYCLES:
            heapq.heappush(queue, (when(f"gw-{d}", cert, history, at), d))
    minute_ratios, hour_ratios = [], []
    for counts in per_cycle:
        span = max(counts) - min(counts) + 1
        total = sum(counts.values())
        minute_ratios.append(max(counts.values()) / (total / span))
        hours = collections.Counter({m // 60: 0 for m in counts})
        for minute, n in counts.items():
            hours[minute // 60] += n
        hour_ratios.append(max(hours.values()) / (total / len(hours)))
    return {
        "peak requests in a minute": max(max(c.values()) for c in per_cycle),
        "peak minute / mean": max(minute_ratios),
        "peak hour / mean": max(hour_ratios),
        "mean requests per minute": sum(per_cycle[0].values())
        / (max(per_cycle[0]) - min(per_cycle[0]) + 1),
        "renewed before 80%": early / renewed,
        "ever expired": len(expired) / devices,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=random.SystemRandom().randrange(2**32))
    args = parser.parse_args()
    print(f"fleet: {args.devices} devices, {CYCLES} cycles of {LIFETIME.days}-day certificates, "
          f"{FAIL:.0%} of attempts failing; seed {args.seed}")  # fmt: skip
    rows = {
        "devid-agent (55-70% by hash, backoff)": ours(RenewalPolicy()),
        "ideal random spread (uniform 55-70%, 60 s retry)": fixed_share(
            0.55, 0.70, random.Random(args.seed + 3)
        ),
        "kubelet-like (uniform 70-90%, 60 s retry)": fixed_share(
            0.70, 0.90, random.Random(args.seed + 1)
        ),
        "fixed 2/3 (no jitter, 60 s retry)": fixed_share(
            2 / 3, 2 / 3, random.Random(args.seed + 2)
        ),
    }
    for name, when in rows.items():
        figures = simulate(args.devices, when, random.Random(args.seed))
        print(f"  {name}")
        for key, value in figures.items():
            text = f"{value:.4%}" if key.startswith(("renewed", "ever")) else f"{value:g}"
            print(f"    {key:<26} {text}")


if __name__ == "__main__":
    main()
