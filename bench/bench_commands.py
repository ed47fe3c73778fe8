"""What one signed command costs the device (printed, never asserted).

In one run, median of N, each beside a reference measured in the same run:
- verify_command of an ES256 command (signer -> intermediate -> root) with the replay memory in
  memory, against one bare ECDSA P-256 verify of the same payload (the ratio says how much the
  envelope, the chain walk and the payload checks add to the signature itself);
- the same with the real ReplayMemory on a private directory (read, lock, atomic write, fsync),
  against the in-memory one;
- a refusal before any signature work (an oversized and a malformed message), against the
  accepted command: what a flood of garbage costs compared with real commands.

Run: .venv/bin/python bench/bench_commands.py [--n 300]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from agent.commands import CommandRefused, ReplayMemory, verify_command  # noqa: E402
from agent.commands import replay as replay_mod  # noqa: E402
from hal.secure_dir import DirStore  # noqa: E402
from tests.support.command_signer import CommandPki, payload  # noqa: E402

DEVICE = "bench-device"


class MemoryReplay:
    def __init__(self) -> None:
        self.state = replay_mod.ReplayState()

    def admit(
        self, command_id: str, *, expires_at: dt.datetime, now: dt.datetime, skew: dt.timedelta
    ) -> None:
        self.state = replay_mod.admit(self.state, command_id, expires_at=expires_at, now=now,
                                      skew=skew, capacity=replay_mod.MAX_CAPACITY)  # fmt: skip


def median_us(fn: Callable[[int], object], n: int) -> float:
    samples = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300)
    n = parser.parse_args().n
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    pki = CommandPki()
    envelopes = [
        pki.signer.envelope(payload(device=DEVICE, issued_at=now, command_id=f"b-{i}"))
        for i in range(3 * n)
    ]
    data = payload(device=DEVICE, issued_at=now)
    sig = pki.signer.key.sign(data, ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg]
    public = pki.signer.certs[0].public_key()
    anchors = [pki.root.cert]
    memory = MemoryReplay()

    def bare(_: int) -> None:
        public.verify(sig, data, ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg]

    def in_memory(i: int) -> None:
        verify_command(envelopes[i], device_id=DEVICE, anchors=anchors, now=now, replay=memory)

    with tempfile.TemporaryDirectory() as tmp:
        disk = ReplayMemory(store=DirStore(Path(tmp) / "state"), capacity=replay_mod.MAX_CAPACITY)

        def on_disk(i: int) -> None:
            verify_command(envelopes[n + i], device_id=DEVICE, anchors=anchors, now=now,
                           replay=disk)  # fmt: skip

        def refused(raw: bytes) -> Callable[[int], None]:
            def run(_: int) -> None:
                with contextlib.suppress(CommandRefused):
                    verify_command(raw, device_id=DEVICE, anchors=anchors, now=now, replay=memory)

            return run

        t_bare = median_us(bare, n)
        t_mem = median_us(in_memory, n)
        t_disk = median_us(on_disk, n)
        t_big = median_us(refused(b"x" * 20000), n)
        t_bad = median_us(refused(b'{"v":1,"payload":"not base64"}'), n)
    print(f"bare ECDSA P-256 verify (reference)        {t_bare:9.1f} us")
    print(f"verify_command, replay in memory           {t_mem:9.1f} us  x{t_mem / t_bare:.1f}")
    print(f"verify_command, ReplayMemory on disk       {t_disk:9.1f} us  x{t_disk / t_mem:.1f} "
          "of in memory")  # fmt: skip
    print(f"refused oversized (20 kB)                  {t_big:9.1f} us  x{t_big / t_mem:.3f} "
          "of an accepted command")  # fmt: skip
    print(f"refused malformed                          {t_bad:9.1f} us  x{t_bad / t_mem:.3f} "
          "of an accepted command")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
