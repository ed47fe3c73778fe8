"""Network faults of the MQTT broker against `devid-agent run` as a real process (its own tpm2
provider, swtpm, our EST server for the enrollment before): a broker certificate for another
host name, an expired one, a man in the middle with another CA's chain, a server that offers
only TLS 1.1, one that drips its handshake a byte a second, a TCP reset right after the accept
(tests/support/faulty_broker.py: mosquitto cannot misbehave so).

Each fault is named in one line, in the daemon's log and in the channel's status over the
control socket; the service goes on (its renewal loop answers `status`); the channel retries
no faster than its configured backoff allows: the gaps between the connections the server
accepted are each at least the lower bound of the draw (mqtt.reconnect_min_seconds, or for a
broker we cannot trust, a security event, half of mqtt.reconnect_max_seconds), so their count
over the window they span is bounded from the config, not from timing. The identity store is
byte-identical before and after. Waits poll observable facts with a bounded deadline.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.device import Device
from tests.support.enroll_env import snapshot
from tests.support.est_server import EstOptions, EstServer
from tests.support.faulty_broker import FAULTS, FaultyBroker
from tests.support.service import Notifications, Service, wait_for
from tests.support.swtpm import Swtpm

RECONNECT_MIN = 0.1
RECONNECT_MAX = 2.0
CONNECT_TIMEOUT = 2.0
#: connections to see before judging the pace (the first and at least two retries)
ATTEMPTS = 3


@dataclass(frozen=True)
class Case:
    line: str  # a regular expression the log line (and the status's last_error) must match
    security: bool  # a broker we cannot trust: logged as a security error, retried slowly


CASES: dict[str, Case] = {
    "other-host": Case(
        r"broker localhost:\d+ is not trusted: its certificate is for another host name "
        r"\(Hostname mismatch, certificate is not valid for 'localhost'",
        True,
    ),
    "expired-cert": Case(
        r"broker localhost:\d+ is not trusted: its certificate has expired \(or this device's "
        r"clock is ahead\) \(certificate has expired\)",
        True,
    ),
    "rogue-ca": Case(
        r"broker localhost:\d+ is not trusted: its chain ends in a root that is not in "
        r"mqtt\.ca_file \(another CA: a man in the middle, or the wrong mqtt\.ca_file\)",
        True,
    ),
    "tls1.1-only": Case(
        r"mqtts://localhost:\d+: TLS handshake failed: the broker offers no TLS version >= 1\.2 "
        r"\(TLS 1\.0 and 1\.1 are never used\)",
        False,
    ),
    "drip-handshake": Case(
        r"mqtts://localhost:\d+: TLS handshake not done within 2 s "
        r"\(mqtt\.connect_timeout_seconds\)$",
        False,
    ),
    "reset": Case(
        r"mqtts://localhost:\d+: the broker closed or reset the connection in the TLS handshake",
        False,
    ),
}


def test_every_fault_has_a_case() -> None:
    assert set(FAULTS) == set(CASES)


@pytest.fixture
def est(tmp_path: Path) -> Iterator[EstServer]:
    with EstServer(tmp_path / "est", EstOptions(cert_lifetime_seconds=3600)) as server:
        yield server


@pytest.fixture
def device(tmp_path: Path, swtpm: Swtpm, est: EstServer) -> Device:
    d = Device(tmp_path, swtpm, est)
    d.basic()
    return d


def with_faulty_broker(device: Device, server: FaultyBroker) -> None:
    """The channel on the faulty broker, and the control socket on (for `status --json`)."""
    run_dir = device.tmp_path / "run"
    text = device.config.read_text().replace("[control]\nenabled = false\n", "")
    text = text.replace("[paths]\n", f'[paths]\nrun_dir = "{run_dir}"\n')
    settings = {"brokers": [server.url], "ca_file": str(server.ca_file),
                "reconnect_min_seconds": RECONNECT_MIN, "reconnect_max_seconds": RECONNECT_MAX,
                "connect_timeout_seconds": CONNECT_TIMEOUT}  # fmt: skip
    text += "[mqtt]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    device.config.write_text(text)


def fault_lines(service: Service) -> list[str]:
    return [
        line for line in service.text().splitlines() if "mqtt: " in line and "localhost:" in line
    ]


def allowed(accepted: list[float], lower: float) -> int:
    """The most connections the backoff allows over the window they span: each retry waits at
    least `lower`, so n connections span at least (n - 1) x lower."""
    return 1 + math.floor((accepted[-1] - accepted[0]) / lower)


@pytest.mark.parametrize("fault", FAULTS)
def test_a_broker_fault_is_named_in_one_line_retried_at_the_backoffs_pace_and_leaves_the_store(
    tmp_path: Path,
    device: Device,
    notify: Notifications,
    services: list[Service],
    fault: str,
) -> None:
    case = CASES[fault]
    enrolled = device.run("enroll")
    assert enrolled.code == 0, enrolled.err
    before = snapshot(device.state_dir / "identity")
    with FaultyBroker(tmp_path / "broker", fault) as server:
        with_faulty_broker(device, server)
        service = Service(device, notify, watchdog_usec=None)
        services.append(service)
        wait_for(
            lambda: server.connections >= ATTEMPTS and len(fault_lines(service)) >= ATTEMPTS,
            f"{ATTEMPTS} connections and as many failures",
            service,
        )
        done = device.run("status", "--json")
        assert done.code != 0 or done.out, done.err  # the channel is down: a degraded status
        model: Any = json.loads(done.out)
        accepted = list(server.accepted)
        assert service.stop() == 0
    assert model["service"]["running"] is True
    assert model["service"]["next_action"] == "renew"  # the renewal loop goes on
    channel = model["service"]["components"]["mqtt"]
    assert channel["connected"] is False
    assert re.search(case.line, channel["last_error"]), channel["last_error"]
    lines = fault_lines(service)
    for line in lines[:ATTEMPTS]:  # one line per failed attempt, naming the fault
        assert re.search(case.line, line), line
        level = "ERROR" if case.security else "WARNING"
        assert level in line, line
        assert ("mqtt: security: " in line) == case.security, line
    # the pace: computed from the config, whatever the draws were
    lower = RECONNECT_MAX / 2 if case.security else RECONNECT_MIN
    if fault == "drip-handshake":  # each attempt lasts its deadline, the backoff starts after it
        lower = CONNECT_TIMEOUT + RECONNECT_MIN
    assert len(accepted) <= allowed(accepted, lower), (accepted, lower)
    assert snapshot(device.state_dir / "identity") == before
