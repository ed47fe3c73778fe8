"""The service's footprint and its rotation time (printed, never asserted).

Against swtpm and the test EST server, in one run:
- idle resident memory and CPU of `devid-agent run` after it enrolled (a 30-day certificate, so
  it only sleeps), beside a reference process that imports the same stack and sleeps
  (`python -c 'import cryptography.x509, tpm2_pytss, ...; sleep'`), both sampled from /proc;
- rotation: from the attempt's `STATUS=renew` notification to the new generation being current
  (one rotation after another with 105 s certificates due 3 s after issue), median of N.
Goals (issue): idle RSS <= 35 MiB, idle CPU <= 0.1 s per minute.

Run: .venv/bin/python bench/bench_daemon.py [--idle-seconds 30] [--rotations 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.enroll_env import config_text, password_file  # noqa: E402
from tests.support.est_server import EstOptions, EstServer  # noqa: E402
from tests.support.swtpm import Swtpm  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
REFERENCE = (
    "import time, cryptography.x509, tpm2_pytss, agent.daemon, agent.enroll, agent.est.client;"
    "time.sleep(3600)"
)


def provider() -> Path:
    return Path((ROOT / ".deps" / "tpm2-provider.path").read_text().strip()).resolve()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def start_daemon(config: Path, notify: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NOTIFY_SOCKET": str(notify)}
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--config", str(config), "run"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def wait_line(sock: socket.socket, prefix: str, deadline: float) -> float:
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536).decode()
        except TimeoutError:
            continue
        if any(line.startswith(prefix) for line in data.split("\n")):
            return time.monotonic()
    raise SystemExit(f"no {prefix!r} notification in time")


def idle(work: Path, tpm: Swtpm, seconds: float) -> None:
    with EstServer(work / "est-idle", EstOptions()) as est:
        config = work / "idle.toml"
        config.write_text(config_text(state_dir=work / "idle-state", est=est, tcti=tpm.tcti,
                                      provider=provider()))  # fmt: skip
        notify = work / "notify-idle"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(notify))
            sock.settimeout(0.5)
            daemon = start_daemon(config, notify)
            reference = subprocess.Popen([sys.executable, "-c", REFERENCE], cwd=ROOT)
            try:
                wait_line(sock, "READY=1", time.monotonic() + 60)
                deadline = time.monotonic() + 60
                while not (work / "idle-state" / "identity" / "current").exists():
                    if time.monotonic() > deadline:
                        raise SystemExit("the daemon did not enroll")
                    time.sleep(0.1)
                time.sleep(2)  # let it settle into its sleep
                c0, r0 = cpu_seconds(daemon.pid), cpu_seconds(reference.pid)
                time.sleep(seconds)
                c1, r1 = cpu_seconds(daemon.pid), cpu_seconds(reference.pid)
                d_rss, r_rss = rss_kib(daemon.pid) / 1024, rss_kib(reference.pid) / 1024
            finally:
                for p in (daemon, reference):
                    p.send_signal(signal.SIGTERM)
                    p.wait(30)
    per_minute = (c1 - c0) * 60 / seconds
    print(f"idle RSS:  daemon {d_rss:.1f} MiB, reference (same imports, asleep) {r_rss:.1f} MiB, "
          f"ratio {d_rss / r_rss:.2f} (goal <= 35 MiB)")  # fmt: skip
    reference_per_minute = (r1 - r0) * 60 / seconds
    print(f"idle CPU:  daemon {per_minute:.3f} s per minute, reference "
          f"{reference_per_minute:.3f} s per minute (goal <= 0.1), "
          f"over {seconds:.0f} s")  # fmt: skip


def rotations(work: Path, tpm: Swtpm, count: int) -> None:
    with EstServer(work / "est-rot", EstOptions(cert_lifetime_seconds=105)) as est:
        config = work / "rot.toml"
        text = config_text(state_dir=work / "rot-state", est=est, tcti=tpm.tcti,
                           provider=provider(), username="device",
                           password_file=str(password_file(work)))  # fmt: skip
        text += "[renewal]\nwindow_start_fraction = 0.6\nwindow_end_fraction = 0.6\n"
        config.write_text(text)
        notify = work / "notify-rot"
        times: list[float] = []
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(notify))
            sock.settimeout(0.5)
            daemon = start_daemon(config, notify)
            try:
                deadline = time.monotonic() + 60 + 10 * count
                while len(times) < count:
                    started = wait_line(sock, "STATUS=renew:", deadline)
                    done = wait_line(sock, "STATUS=identity generation", deadline)
                    times.append(done - started)
            finally:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(30)
    print(f"rotation:  trigger -> new identity current (new TPM key, EST renew, mTLS proof), "
          f"median of {count}: {statistics.median(times) * 1e3:.0f} ms "
          f"(min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle-seconds", type=float, default=30)
    parser.add_argument("--rotations", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tpm = Swtpm(work / "tpm").start()
        try:
            idle(work, tpm, args.idle_seconds)
            rotations(work, tpm, args.rotations)
        finally:
            tpm.stop()


if __name__ == "__main__":
    main()
