"""The service's footprint and its rotation time (printed, never asserted).

Against swtpm, the test EST server and a mosquitto, in one run:
- idle resident memory and CPU of `devid-agent run` after it enrolled (a 30-day certificate, so
  it only sleeps), as a device runs it: the control socket on (one `status` asked through it, so
  the service's key check ran), the metrics textfile, the MQTT channel connected with the TPM key.
  Beside it, sampled from /proc at the same moment, two references asleep: a process importing
  the whole stack as the service did when its attempts ran in its own process (`python -c
  'import cryptography.x509, tpm2_pytss, paho.mqtt.client, agent.enroll, ...; sleep'`), and bare
  `python -c 'sleep'`. Whether the TPM stack (tpm2-pytss) is mapped into the service is printed
  too: the attempts run in a process of their own (agent/attempt_process.py);
- rotation: from the attempt's `STATUS=renew` notification to the new generation being current
  (one rotation after another with 105 s certificates due 3 s after issue), median of N; each
  includes starting the attempt process.
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
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import provider_path  # noqa: E402
from tests.support.enroll_env import config_text, password_file  # noqa: E402
from tests.support.est_server import EstOptions, EstServer  # noqa: E402
from tests.support.mosquitto import Mosquitto  # noqa: E402
from tests.support.procs import cpu_seconds, rss_kib  # noqa: E402
from tests.support.swtpm import Swtpm  # noqa: E402

WHOLE_STACK = (
    "import time, ssl, cryptography.x509, tpm2_pytss, paho.mqtt.client, agent.daemon, "
    "agent.enroll, agent.est.client, agent.mqtt.channel, agent.control.server; time.sleep(3600)"
)
BARE = "import time; time.sleep(3600)"


def maps_tpm_stack(pid: int) -> bool:
    return "tpm2_pytss" in Path(f"/proc/{pid}/maps").read_text()


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


def wait_for(what: str, ready: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not in time")
        time.sleep(0.1)


def device_config(work: Path, est: EstServer, tpm: Swtpm, broker: Mosquitto | None) -> Path:
    """EST, the control socket and the metrics textfile; the MQTT channel with `broker`."""
    state, run = work / "state", work / "run"
    run.mkdir(mode=0o755)
    text = config_text(state_dir=state, est=est, tcti=tpm.tcti, provider=provider_path())
    text = text.replace("[paths]\n", f'[paths]\nrun_dir = "{run}"\n', 1)
    text = text.replace("[control]\nenabled = false\n", "[control]\nenabled = true\n")
    text += f'[metrics]\ntextfile = "{work / "metrics.prom"}"\n'
    if broker is not None:
        text += f'[mqtt]\nbrokers = ["{broker.url}"]\nca_file = "{broker.ca_file}"\n'
    config = work / "service.toml"
    config.write_text(text)
    return config


def idle(work: Path, tpm: Swtpm, seconds: float) -> None:
    with EstServer(work / "est-idle", EstOptions()) as est:
        (work / "identity").mkdir()
        measure_idle(work / "identity", device_config(work / "identity", est, tpm, None), seconds,
                     "EST, control socket (one status asked), metrics")  # fmt: skip
        broker = Mosquitto(work / "broker", device_ca=est.ca).start()
        try:
            (work / "mqtt").mkdir()
            measure_idle(work / "mqtt", device_config(work / "mqtt", est, tpm, broker), seconds,
                         "the same and the MQTT channel, connected with the TPM key")  # fmt: skip
        finally:
            broker.stop()


def measure_idle(work: Path, config: Path, seconds: float, what: str) -> None:
    notify = work / "notify"
    status = [sys.executable, "-m", "agent.cli", "--config", str(config), "status", "--json"]
    mqtt = "[mqtt]" in config.read_text()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        sock.settimeout(0.5)
        daemon = start_daemon(config, notify)
        whole = subprocess.Popen([sys.executable, "-c", WHOLE_STACK], cwd=ROOT)
        bare = subprocess.Popen([sys.executable, "-c", BARE], cwd=ROOT)
        try:
            wait_line(sock, "READY=1", time.monotonic() + 60)
            wait_for("enrolled", (work / "state" / "identity" / "current").exists)
            wait_for("a status from the service", lambda: (b'"connected": true' if mqtt else
                     b'"service"') in subprocess.run(status, cwd=ROOT, capture_output=True,
                                                      check=False).stdout)  # fmt: skip
            time.sleep(2)  # let it settle into its sleep
            c0, w0 = cpu_seconds(daemon.pid), cpu_seconds(whole.pid)
            time.sleep(seconds)
            c1, w1 = cpu_seconds(daemon.pid), cpu_seconds(whole.pid)
            d_rss = rss_kib(daemon.pid) / 1024
            w_rss, b_rss = rss_kib(whole.pid) / 1024, rss_kib(bare.pid) / 1024
            tpm_stack = maps_tpm_stack(daemon.pid)
        finally:
            for p in (daemon, whole, bare):
                p.send_signal(signal.SIGTERM)
                p.wait(30)
    print(f"{what}:")
    print(f"  idle RSS: service {d_rss:.1f} MiB (goal <= 35 MiB); beside it, asleep: the whole "
          f"stack in one process {w_rss:.1f} MiB (service / that {d_rss / w_rss:.2f}), bare "
          f"python {b_rss:.1f} MiB (service / that {d_rss / b_rss:.2f}); tpm2-pytss mapped in "
          f"the service: {'yes' if tpm_stack else 'no'}")  # fmt: skip
    per_minute = (c1 - c0) * 60 / seconds
    whole_per_minute = (w1 - w0) * 60 / seconds
    print(f"  idle CPU: service {per_minute:.3f} s per minute, the whole stack asleep "
          f"{whole_per_minute:.3f} s per minute (goal <= 0.1), over {seconds:.0f} s")  # fmt: skip


def rotations(work: Path, tpm: Swtpm, count: int) -> None:
    with EstServer(work / "est-rot", EstOptions(cert_lifetime_seconds=105)) as est:
        config = work / "rot.toml"
        text = config_text(state_dir=work / "rot-state", est=est, tcti=tpm.tcti,
                           provider=provider_path(), username="device",
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
