"""doctor's mqtt_broker check against a real mosquitto (require_certificate, the device CA
trusted or not), with the device's TPM identity: accepted, refused, unreachable, failover, not
enrolled. doctor runs as a process (it loads its own tpm2 provider)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support import procs
from tests.support.ca import TestCA
from tests.support.device import Device
from tests.support.est_server import EstServer
from tests.support.mosquitto import Mosquitto


def with_brokers(device: Device, ca_file: Path, *urls: str) -> None:
    text = device.config.read_text() + "[mqtt]\n"
    text += f"brokers = {json.dumps(list(urls))}\nca_file = {json.dumps(str(ca_file))}\n"
    text += "connect_timeout_seconds = 3.0\n"
    device.config.write_text(text)


def finding(device: Device) -> dict[str, str]:
    run = device.run("doctor", "--json")
    found = {f["check"]: f for f in json.loads(run.out)}
    return found["mqtt_broker"]  # type: ignore[no-any-return]


def closed_url() -> str:
    return f"mqtts://localhost:{procs.free_port()}"  # nothing listens there


def test_a_broker_that_takes_the_identity_is_ok_and_the_first_one_down_fails_over(
    tmp_path: Path, device: Device, est: EstServer
) -> None:
    device.basic()
    assert device.run("enroll").code == 0
    with Mosquitto(tmp_path / "broker", device_ca=est.ca) as broker:
        with_brokers(device, broker.ca_file, closed_url(), broker.url)
        got = finding(device)
        assert got["status"] == "ok", got
        assert got["detail"].startswith(f"{broker.url} accepts identity generation 1 (CONNACK")
        assert "gw-0001-probe" in broker.log_text()  # its own client id: the session stays


def test_a_broker_that_does_not_trust_the_device_ca_is_an_error_naming_the_alert(
    tmp_path: Path, device: Device, est: EstServer
) -> None:
    device.basic()
    assert device.run("enroll").code == 0
    broker = Mosquitto(tmp_path / "broker", device_ca=est.ca)
    broker.trust(TestCA(name="another device CA"))  # not ours
    with broker:
        with_brokers(device, broker.ca_file, broker.url)
        got = finding(device)
    assert got["status"] == "error"
    assert "unknown_ca" in got["detail"] and got["detail"].startswith(broker.url)


def test_a_broker_we_cannot_trust_is_an_error(
    tmp_path: Path, device: Device, est: EstServer
) -> None:
    device.basic()
    assert device.run("enroll").code == 0
    with Mosquitto(tmp_path / "broker", device_ca=est.ca) as broker:
        other = TestCA(name="not the broker's CA").write_cert(tmp_path / "other-ca.pem")
        with_brokers(device, other, broker.url)
        got = finding(device)
    assert got["status"] == "error" and "the broker's certificate" in got["detail"], got


def test_no_broker_reachable_and_not_enrolled(tmp_path: Path, device: Device) -> None:
    device.basic()
    ca = TestCA(name="a broker CA").write_cert(tmp_path / "ca.pem")
    with_brokers(device, ca, closed_url(), closed_url())
    got = finding(device)
    assert got["status"] == "warning" and "not enrolled" in got["detail"]
    assert device.run("enroll").code == 0
    got = finding(device)
    assert got["status"] == "error" and got["detail"].startswith("no broker reachable: ")
    assert got["detail"].count("mqtts://localhost:") == 2
