"""A rotation soak (printed, never asserted; not part of CI): `devid-agent run` rotating its
identity back to back against swtpm and the test EST server, for --rotations rotations.

Each certificate lives 105 s and is due at 0.575 of its lifetime; the test server back-dates
notBefore by 60 s, so every new identity is due ~0.4 s after it is issued: the service rotates
as fast as its renewal path allows, with a new TPM key, an EST renew and the mTLS proof each time.

Printed, at the 10th rotation (warm) and at the last:
- resident memory (VmRSS) and its growth (goal: <= 1 MiB over 1,000 rotations),
- open descriptors (goal: the same count),
and TPM transient objects before the service starts and after it stops (goal: the same count),
failed attempts seen in the STATUS= lines (goal 0), rotations per second.

With --broker, a mosquitto (mutual TLS, the device CA trusted) is started too and the service
keeps its MQTT channel: every rotation then also moves the channel to the new identity (hot
swap), and the broker's log counts the connections (goal: one per identity).

Run: .venv/bin/python bench/bench_soak.py [--rotations 1000] [--broker]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hal.tpm import transient_objects  # noqa: E402
from tests.conftest import provider_path  # noqa: E402
from tests.support.enroll_env import config_text, password_file  # noqa: E402
from tests.support.est_server import EstOptions, EstServer  # noqa: E402
from tests.support.mosquitto import Mosquitto  # noqa: E402
from tests.support.procs import rss_kib  # noqa: E402
from tests.support.swtpm import Swtpm  # noqa: E402

WARM = 10
GENERATION = re.compile(r"STATUS=identity generation (\d+),")


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def soak(work: Path, tpm: Swtpm, count: int, with_broker: bool) -> None:
    with EstServer(work / "est", EstOptions(cert_lifetime_seconds=105)) as est:
        broker = Mosquitto(work / "broker", device_ca=est.ca).start() if with_broker else None
        config = work / "soak.toml"
        text = config_text(state_dir=work / "state", est=est, tcti=tpm.tcti,
                           provider=provider_path(), username="device",
                           password_file=str(password_file(work)))  # fmt: skip
        text += "[renewal]\nwindow_start_fraction = 0.575\nwindow_end_fraction = 0.575\n"
        if broker is not None:
            text += f'[mqtt]\nbrokers = ["{broker.url}"]\nca_file = "{broker.ca_file}"\n'
        config.write_text(text)
        objects_before = transient_objects(tpm.tcti)[0]
        notify = work / "notify"
        log = work / "daemon.log"
        rotations = generation = reported = 0
        samples: dict[str, tuple[int, int, int]] = {}
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, log.open("wb") as log_file:
            sock.bind(str(notify))
            sock.settimeout(0.5)
            env = {**os.environ, "NOTIFY_SOCKET": str(notify)}
            daemon = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "--config", str(config), "run"],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log_file,
            )  # fmt: skip
            started = time.monotonic()
            last_progress = started
            try:
                while rotations < count:
                    if time.monotonic() - last_progress > 120:
                        raise SystemExit(f"no rotation for 120 s after {rotations}")
                    try:
                        data = sock.recv(65536).decode()
                    except TimeoutError:
                        continue
                    for line in data.split("\n"):
                        found = GENERATION.match(line)
                        if found and int(found[1]) > generation:
                            generation = int(found[1])
                            rotations = generation - 1  # generation 1 is the enrollment
                            last_progress = time.monotonic()
                            for mark in ("warm", "end"):
                                due = WARM if mark == "warm" else count
                                if rotations >= due and mark not in samples:
                                    sample = (rss_kib(daemon.pid), descriptors(daemon.pid))
                                    samples[mark] = (rotations, *sample)
                            if rotations // 100 > reported // 100:
                                print(f"  {rotations} rotations", flush=True)
                            reported = rotations
                elapsed = time.monotonic() - started
            finally:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(60)
                if broker is not None:
                    broker.stop()
        objects_after = transient_objects(tpm.tcti)[0]
        connections = 0
        if broker is not None:
            connections = broker.log_text().count("New client connected")
        failures = log.read_text().count(" failed (")  # the daemon's "renew failed (...)" lines
    (warm, warm_rss, warm_fds), (end, end_rss, end_fds) = samples["warm"], samples["end"]
    print(f"soak: {end} rotations in {elapsed:.0f} s ({end / elapsed:.2f} per second), "
          f"failed attempts {failures} (goal 0)")  # fmt: skip
    print(f"memory: VmRSS {warm_rss / 1024:.1f} MiB at rotation {warm}, {end_rss / 1024:.1f} MiB "
          f"at {end}: growth {(end_rss - warm_rss) / 1024:+.2f} MiB (goal <= 1 MiB)")  # fmt: skip
    print(f"descriptors: {warm_fds} at rotation {warm}, {end_fds} at {end} (goal: equal)")
    print(
        f"TPM transient objects: {objects_before} before start, {objects_after} after stop "
        "(goal: equal)"
    )
    if with_broker:
        print(f"MQTT: {connections} connections at the broker for {generation} identities "
              "(goal: one per identity: each rotation moved the channel once)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rotations", type=int, default=1000)
    parser.add_argument("--broker", action="store_true", help="with an MQTT channel (mosquitto)")
    args = parser.parse_args()
    if args.rotations <= WARM:
        raise SystemExit(f"--rotations must be above {WARM}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tpm = Swtpm(work / "tpm").start()
        try:
            soak(work, tpm, args.rotations, args.broker)
        finally:
            tpm.stop()


if __name__ == "__main__":
    main()
