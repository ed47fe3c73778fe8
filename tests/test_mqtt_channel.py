"""The device channel against a real mosquitto, with `devid-agent run` as a real process (its
own tpm2 provider, swtpm, our EST server): round trips over TLS 1.2 and 1.3 with TPM keys, the
retained status and the last will seen by a second client, the hot swap after a rotation with
the old certificate revoked at the broker, broker restarts, each rejection reason, failover.

Waits poll observable facts (messages the observer received, files, the TPM's object count)
with a generous deadline; nothing asserts how fast anything is.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hal.tpm import transient_objects
from tests.support.device import Device
from tests.support.est_server import EstOptions, EstServer
from tests.support.mosquitto import Mosquitto, Observer
from tests.support.swtpm import Swtpm
from tests.test_daemon import Notifications, Service, wait_for

LIFETIME = 105
DEVICE = "gw-0001"
STATUS = f"devid/{DEVICE}/status"
EVENTS = f"devid/{DEVICE}/events"
COMMANDS = f"devid/{DEVICE}/commands"
RESPONSES = f"devid/{DEVICE}/commands/response"


@pytest.fixture
def est(tmp_path: Path) -> Iterator[EstServer]:
    with EstServer(tmp_path / "est", EstOptions(cert_lifetime_seconds=3600)) as server:
        yield server


@pytest.fixture
def device(tmp_path: Path, swtpm: Swtpm, est: EstServer) -> Device:
    d = Device(tmp_path, swtpm, est)
    d.basic()
    return d


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[Notifications]:
    n = Notifications(tmp_path / "notify")
    yield n
    n.close()


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.stop(signal.SIGKILL)


@pytest.fixture
def observers() -> Iterator[list[Observer]]:
    made: list[Observer] = []
    yield made
    for o in made:
        o.close()


def broker(tmp_path: Path, est: EstServer, name: str = "broker", **kw: Any) -> Mosquitto:
    return Mosquitto(tmp_path / name, device_ca=est.ca, **kw)


def with_mqtt(device: Device, *brokers: Mosquitto | str, **keys: Any) -> None:
    urls = [b if isinstance(b, str) else b.url for b in brokers]
    first = next(b for b in brokers if isinstance(b, Mosquitto))
    settings = {"brokers": urls, "ca_file": str(first.ca_file), "reconnect_min_seconds": 0.2,
                "reconnect_max_seconds": 1.0, "connect_timeout_seconds": 5.0, **keys}  # fmt: skip
    text = device.config.read_text() + "[mqtt]\n"
    text += "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    device.config.write_text(text)


def observe(broker: Mosquitto, observers: list[Observer], **kw: Any) -> Observer:
    o = Observer(broker, **kw)
    observers.append(o)
    assert o.connected.wait(30), broker.log_text()[-2000:]
    return o


def online(o: Observer, generation: int | None = None) -> Callable[[], bool]:
    def check() -> bool:
        got = o.payloads(STATUS)
        if not got or not got[-1]["online"]:
            return False
        channel: Any = got[-1]["channel"]
        return generation is None or channel.get("generation") == generation

    return check


def event_kinds(o: Observer) -> list[str]:
    return [str(p["event"]) for p in o.payloads(EVENTS)]


def until(check: Callable[[], bool], what: str, seconds: float = 60) -> None:
    """For facts after the daemon stopped (wait_for needs it running)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.02)


@pytest.mark.parametrize("tls12", [False, True], ids=["tls1.3", "tls1.2"])
def test_round_trip_with_the_tpm_key_status_retained_command_answered_and_a_clean_stop(
    tmp_path: Path,
    device: Device,
    est: EstServer,
    notify: Notifications,
    services: list[Service],
    observers: list[Observer],
    tls12: bool,
) -> None:
    with broker(tmp_path, est, tls12_only=tls12) as mosquitto:
        with_mqtt(device, mosquitto)
        watcher = observe(mosquitto, observers)
        service = Service(device, notify, watchdog_usec=None)
        services.append(service)
        wait_for(online(watcher, 1), "the retained online status", service)
        status: Any = watcher.payloads(STATUS)[-1]
        assert status["schema_version"] == 1 and status["device"] == DEVICE
        assert status["status"]["identity"]["generation"] == 1
        assert status["status"]["service"]["next_action"] == "renew"
        assert status["channel"]["broker"] == mosquitto.url.replace("localhost", "localhost")
        assert transient_objects(device.tpm.tcti)[0] == 1  # the channel's context: 1 slot
        late = observe(mosquitto, observers, topic=STATUS)  # a new subscriber gets it retained
        wait_for(lambda: bool(late.messages) and late.messages[0][2], "the retained one", service)
        wait_for(lambda: "enrolled" in event_kinds(watcher), "the enrolled event", service)
        watcher.publish(COMMANDS, b'{"v":1}')
        wait_for(lambda: bool(watcher.payloads(RESPONSES)), "a command response", service)
        reply: Any = watcher.payloads(RESPONSES)[-1]
        assert reply["ok"] is False and reply["code"] == "not_configured"
        wait_for(lambda: "command_refused" in event_kinds(watcher), "the refusal event", service)
        assert service.stop() == 0
        until(lambda: not watcher.payloads(STATUS)[-1]["online"], "the offline status")
        assert watcher.payloads(STATUS)[-1]["reason"] == "stopped"
        assert f"u'{DEVICE}'" in mosquitto.log_text()  # the broker saw our certificate's CN
        assert transient_objects(device.tpm.tcti)[0] == 0
