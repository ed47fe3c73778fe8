"""The CA refresh schedule across a fleet, and the cost of judging a /cacerts answer.

10,000 devices with the same CA set and the default daily interval: the real policy
(agent/ca_refresh.py) places each device's refresh; printed, never asserted: the peak-minute
count against the mean (goal <= 2x of what an ideal uniform random spread gives in the same
run, shown as the reference row), and the share of devices whose point moves after a restart
(goal 0). Then `judge` over a same set and over a real RFC 7030 4.1.3 rollover answer (4
certificates), median of 200, against parsing the same PEM once (reference).

Run: .venv/bin/python bench/bench_ca_refresh.py [--devices 10000] [--seed N]
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402

from agent.ca_refresh import RefreshPolicy, judge, next_refresh  # noqa: E402
from tests.support.ca import TestCA, pem, utcnow  # noqa: E402

NOW = datetime(2026, 6, 1, 12, 0, 7, tzinfo=timezone.utc)


def peak_ratio(offsets: list[float]) -> tuple[int, float]:
    per_minute = collections.Counter(int(o // 60) for o in offsets)
    mean = len(offsets) / (86400 / 60)
    return max(per_minute.values()), max(per_minute.values()) / mean


def median_ms(call: object, n: int = 200) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        call()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=random.randrange(2**32))
    args = parser.parse_args()
    policy = RefreshPolicy()
    ca_set = "f" * 64

    def point(device: str, now: datetime) -> datetime:
        at = next_refresh(device_id=device, ca_set=ca_set, now=now, last_attempt=None,
                          failures=0, expiry=None, policy=policy)  # fmt: skip
        assert at is not None
        return at

    devices = [f"gw-{i:05d}" for i in range(args.devices)]
    points = [point(d, NOW) for d in devices]
    offsets = [((p - NOW).total_seconds()) for p in points]
    peak, ratio = peak_ratio(offsets)
    rng = random.Random(args.seed)
    ideal_peak, ideal = peak_ratio([rng.uniform(0, 86400) for _ in devices])
    later = NOW + timedelta(minutes=1)
    pairs = zip(devices, points, strict=True)
    moved = sum(1 for d, p in pairs if p > later and point(d, later) != p)
    print(f"fleet of {args.devices}, daily interval (seed {args.seed}):")
    print(f"  policy           peak minute {peak:4d}  peak/mean {ratio:.2f}x")
    print(f"  uniform random   peak minute {ideal_peak:4d}  peak/mean {ideal:.2f}x  (reference)")
    print(f"  policy / reference peak: {ratio / ideal:.2f}x (goal <= 2x)")
    print(f"  points moved by a restart: {moved} of {args.devices} (goal 0)")

    old = TestCA(name="EST root")
    new = TestCA(name="EST root")
    link = {"subject": old.cert.subject, "ca": True, "lifetime": timedelta(days=900)}
    answer = [new.cert, old.issue(new.key.public_key(), **link),  # type: ignore[arg-type]
              new.issue(old.key.public_key(), **link), old.cert]  # type: ignore[arg-type]  # fmt: skip
    blob = b"".join(pem(c) for c in answer)
    now, skew = utcnow(), timedelta(seconds=300)
    parse = median_ms(lambda: x509.load_pem_x509_certificates(blob))
    same = median_ms(lambda: judge([old.cert], anchors=[old.cert], current=[old.cert], now=now,
                                   skew=skew))  # fmt: skip
    roll = median_ms(lambda: judge(answer, anchors=[old.cert], current=[old.cert], now=now,
                                   skew=skew))  # fmt: skip
    print("judge a /cacerts answer (median of 200):")
    print(f"  parse 4 PEM certificates      {parse:6.3f} ms  (reference)")
    print(f"  same set (1 root)             {same:6.3f} ms  {same / parse:5.1f}x")
    print(f"  rollover (4 certificates)     {roll:6.3f} ms  {roll / parse:5.1f}x")


if __name__ == "__main__":
    main()
