"""The device channel's figures (printed, never asserted), against swtpm, the test EST server and
a real mosquitto, in one run:

- connect to CONNACK with the TPM key (TLS 1.3, a fresh paho Client and context each time, as the
  channel does), median of N, beside the same with a software key;
- rotation proven -> connected as the new identity: `devid-agent run` rotating by itself (105 s
  certificates due 3 s after issue), from its log line "the new identity (generation N) proved
  itself" to "mqtt: connected ... as identity generation N", median of N (goal <= 1 s);
- idle CPU of the daemon with a connected channel (keepalive 60 s, a 30-day certificate) over a
  shorter window, scaled to a minute (goal <= 0.1 s per minute), beside the daemon without MQTT;
- 1,000 simulated devices that lost their broker at once, which is back after 1, 5, 10 and 30 s,
  with the channel's reconnect plan (agent/mqtt/backoff.py, a seeded random source, the seed
  printed): connections in the busiest second / the mean per second, from the broker's return
  until 99% are back (goal <= 3x; also to the last one), beside paho's own doubling without
  jitter (all in one second), and one device's attempts while the broker stays down an hour.
  The mean counts from the return, not from the loss: no device can connect during the outage.

Run: .venv/bin/python bench/bench_mqtt.py [--n 20] [--idle-seconds 30] [--seed 1] [--fleet-only]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.mqtt.backoff import ReconnectPlan, ReconnectPolicy  # noqa: E402
from tests.conftest import provider_path  # noqa: E402
from tests.support.enroll_env import config_text, password_file  # noqa: E402
from tests.support.est_server import EstOptions, EstServer  # noqa: E402
from tests.support.mosquitto import Mosquitto  # noqa: E402
from tests.support.procs import cpu_seconds  # noqa: E402
from tests.support.swtpm import Swtpm  # noqa: E402


def connect_once(broker: Mosquitto, cert: Path, key: Path) -> float:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    from agent.tls import client_context

    start = time.perf_counter()
    ctx = client_context(ca_file=broker.ca_file, cert_file=cert, key_file=key)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="gw-0001", protocol=MQTTProtocolVersion.MQTTv5
    )
    client.tls_set_context(ctx)
    done: list[bool] = []
    client.on_connect = lambda *a: done.append(True)
    client.connect("localhost", broker.port, 60)
    while not done:
        sock = client.socket()
        select.select([sock], [], [], 5)
        client.loop_read()
    elapsed = time.perf_counter() - start
    client.disconnect()
    return elapsed


def stamp(line: str) -> float:
    moment = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return moment.timestamp()


def rotation_to_connected(log: str) -> list[float]:
    proved: dict[int, float] = {}
    out = []
    for line in log.splitlines():
        if "proved itself over mutual TLS" in line:
            generation = int(line.split("(generation ")[1].split(")")[0])
            proved[generation] = stamp(line)
        elif "mqtt: connected to" in line:
            generation = int(line.rsplit(" ", 1)[1])
            if generation in proved:
                out.append(stamp(line) - proved.pop(generation))
    return out


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--config", str(config), "run"],
        cwd=ROOT,
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )


def wait(check: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"no {what} within {seconds} s")
        time.sleep(0.05)


def mqtt_section(broker: Mosquitto, keepalive: int = 60) -> str:
    return (
        f'[mqtt]\nbrokers = ["{broker.url}"]\nca_file = "{broker.ca_file}"\n'
        f"keepalive_seconds = {keepalive}\n"
    )


@dataclass(frozen=True)
class Return:
    """A fleet's return after its broker came back, in seconds from the broker's return."""

    back: list[float]  # each device's first attempt at or after the return, sorted

    def window(self, share: float) -> int:
        """The whole seconds until `share` of the fleet is back (at least 1)."""
        return max(1, math.ceil(self.back[math.ceil(share * len(self.back)) - 1]))

    def busiest(self) -> int:
        return max(Counter(int(t) for t in self.back).values())

    def ratio(self, share: float) -> float:
        """The busiest second / the mean second over the window in which `share` is back."""
        window = self.window(share)
        return self.busiest() / (sum(t < window for t in self.back) / window)


def fleet(devices: int, down_seconds: float, rng: random.Random) -> Return:
    """Every device lost the broker at 0; it accepts again from `down_seconds`; each device
    follows the channel's plan (reconnect 1-120 s, attempts taking no time) until its first
    attempt at or after the return."""
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    back = []
    for _ in range(devices):
        plan = ReconnectPlan(1, ReconnectPolicy(1.0, 120.0), rng)
        plan.lost(t0)
        while True:
            assert plan.at is not None
            t = (plan.at - t0).total_seconds()
            if t >= down_seconds:
                back.append(t - down_seconds)
                break
            plan.failed(plan.at)
    return Return(sorted(back))


def paho_attempts(until_seconds: float) -> list[float]:
    """paho's own reconnect without jitter (reconnect_delay_set(1, 120)): 1 s doubling to 120 s
    after each failed attempt, the same on every device."""
    t, delay, out = 0.0, 1.0, []
    while t < until_seconds:
        t += delay
        out.append(t)
        delay = min(delay * 2, 120.0)
    return out


def attempts_in(seconds: float, rng: random.Random) -> int:
    """One device's attempts while its broker stays down for `seconds` (ours)."""
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    plan = ReconnectPlan(1, ReconnectPolicy(1.0, 120.0), rng)
    plan.lost(t0)
    count = 0
    while plan.at is not None and (plan.at - t0).total_seconds() < seconds:
        count += 1
        plan.failed(plan.at)
    return count


def fleet_part(seed: int, devices: int = 1000) -> None:
    print(f"{devices:,} devices lose the broker at once (reconnect 1-120 s, seed {seed}): "
          "busiest second / mean second, from the broker's return until 99% are back "
          "(goal <= 3)")  # fmt: skip
    rng = random.Random(seed)
    for down in (1.0, 5.0, 10.0, 30.0):
        ours = fleet(devices, down, rng)
        window = ours.window(0.99)
        paho_back = next(t for t in paho_attempts(down) if t >= down) - down
        print(f"  down {down:>2g} s: ours {ours.ratio(0.99):.2f}x ({ours.busiest()} in the "
              f"busiest second; 99% back in {window} s, median "
              f"{statistics.median(ours.back):.1f} s; to the last one {ours.ratio(1.0):.2f}x); "
              f"paho's doubling {window}x over the same window (all {devices:,} in one second, "
              f"{paho_back:.0f} s after the return)")  # fmt: skip
    hour = 3600.0
    print(f"  a broker down for an hour: {attempts_in(hour, rng)} attempts per device "
          f"(paho's doubling: {len(paho_attempts(hour))})")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1, help="the fleet's random source")
    parser.add_argument("--fleet-only", action="store_true", help="only the fleet (no servers)")
    args = parser.parse_args()
    if args.fleet_only:
        fleet_part(args.seed)
        return 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tpm = Swtpm(tmp / "tpm").start()
        est = EstServer(tmp / "est", EstOptions(cert_lifetime_seconds=30 * 86400)).start()
        broker = Mosquitto(tmp / "broker", device_ca=est.ca).start()
        try:
            state = tmp / "state"
            config = tmp / "config.toml"
            base = config_text(
                state_dir=state, est=est, tcti=tpm.tcti, provider=provider_path(),
                username="device", password_file=str(password_file(tmp)),
                proof_of_possession="never",
            )  # fmt: skip
            config.write_text(base)
            enrolled = subprocess.run(
                [sys.executable, "-m", "agent.cli", "--config", str(config), "enroll"],
                cwd=ROOT, capture_output=True, text=True, check=False,
            )  # fmt: skip
            if enrolled.returncode != 0:
                raise SystemExit(enrolled.stderr)
            gen = (state / "identity" / "current").resolve()
            # 1. connect to CONNACK
            from agent.config import load_config
            from agent.wiring import load_provider

            load_provider(load_config(config))
            tpm_times = [
                connect_once(broker, gen / "fullchain.pem", gen / "key.tss2.pem")
                for _ in range(args.n)
            ]
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import ec

            soft_key = ec.generate_private_key(ec.SECP256R1())
            soft_cert = est.ca.issue(soft_key.public_key(), subject="gw-0001")
            (tmp / "soft.pem").write_bytes(soft_cert.public_bytes(serialization.Encoding.PEM))
            (tmp / "soft.key").write_bytes(
                soft_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            soft_times = [
                connect_once(broker, tmp / "soft.pem", tmp / "soft.key") for _ in range(args.n)
            ]
            tpm_ms = statistics.median(tpm_times) * 1000
            soft_ms = statistics.median(soft_times) * 1000
            print(f"connect to CONNACK, TPM key (TLS 1.3), median of {args.n}: {tpm_ms:.1f} ms")
            ratio = tpm_ms / soft_ms
            print(f"  the same with a software key: {soft_ms:.1f} ms (TPM/software {ratio:.1f}x)")

            # 3. idle CPU with a connected channel, then without MQTT
            runs = (("with MQTT", base + mqtt_section(broker), "mqtt: connected"),
                    ("without MQTT", base, "devid-agent is running"))  # fmt: skip
            for label, text, ready in runs:
                config.write_text(text)
                log = tmp / f"idle-{label}.log"
                proc = start_daemon(config, log)
                try:
                    wait(lambda log=log, ready=ready: ready in log.read_text(), 60, ready)
                    time.sleep(1.0)  # let start-up settle (bench only: not a synchronisation)
                    before = cpu_seconds(proc.pid)
                    time.sleep(args.idle_seconds)
                    used = cpu_seconds(proc.pid) - before
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(30)
                per_minute = used * 60 / args.idle_seconds
                window = f"{args.idle_seconds:g} s"
                print(f"idle CPU of the daemon {label} (keepalive 60 s), over {window}: "
                      f"{per_minute:.3f} s per minute (goal <= 0.1)")  # fmt: skip

            # 2. rotation proven -> connected as the new identity
            est.options.cert_lifetime_seconds = 105
            rotating = base + "[renewal]\nwindow_start_fraction = 0.6\nwindow_end_fraction = 0.6\n"
            config.write_text(rotating + mqtt_section(broker))
            subprocess.run(
                [sys.executable, "-m", "agent.cli", "--config", str(config), "enroll", "--force"],
                cwd=ROOT, capture_output=True, check=True,
            )  # fmt: skip
            log = tmp / "rotations.log"
            proc = start_daemon(config, log)
            try:
                wait(lambda: len(rotation_to_connected(log.read_text())) >= args.n,
                     args.n * 30, "rotations")  # fmt: skip
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
            swaps = rotation_to_connected(log.read_text())[: args.n]
            swap_ms = statistics.median(swaps) * 1000
            print(f"rotation proven -> connected as the new identity, median of {len(swaps)}: "
                  f"{swap_ms:.1f} ms (goal <= 1000; max {max(swaps) * 1000:.1f} ms; "
                  f"{swap_ms / tpm_ms:.1f}x a bare connect)")  # fmt: skip
        finally:
            broker.stop()
            est.stop()
            tpm.stop()
    # 4. the fleet after a broker restart
    fleet_part(args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
