"""The service's scheduled /cacerts refresh and its metrics file, as a real process: swtpm, the
test EST server (which can roll its root over, RFC 7030 4.1.3), short intervals from the config.

Waits poll observable facts (the audit trail, the stored files, the metrics file, the log) with
a generous deadline; nothing asserts how fast anything is.
"""

from __future__ import annotations

import json
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from agent import __version__
from agent.est.response import fingerprint
from tests.support.ca import pem
from tests.support.device import Device
from tests.support.est_server import EstOptions, EstServer
from tests.support.service import LIFETIME, Notifications, Service, configure, current, wait_for
from tests.support.swtpm import Swtpm

Metrics = dict[str, list[tuple[dict[str, str], float]]]


@pytest.fixture
def est(tmp_path: Path) -> Iterator[EstServer]:
    with EstServer(tmp_path / "est", EstOptions(cert_lifetime_seconds=LIFETIME)) as server:
        yield server


@pytest.fixture
def device(tmp_path: Path, swtpm: Swtpm, est: EstServer) -> Device:
    d = Device(tmp_path, swtpm, est)
    d.basic()
    d.configure(cacerts_refresh_seconds=1)  # a refresh about every second
    return d


def service_config(device: Device, window: float = 0.95) -> None:
    """No renewal due for a while (at `window` of the lifetime), a CA refresh about every
    second, the metrics file rewritten every second."""
    device.configure()  # afresh: [renewal] and [metrics] follow
    configure(device, window_start_fraction=window, window_end_fraction=window)
    with device.config.open("a") as f:
        f.write(f'[metrics]\ntextfile = "{metrics_file(device)}"\ninterval_seconds = 1\n')


def start(device: Device, notify: Notifications, services: list[Service]) -> Service:
    service_config(device)
    service = Service(device, notify, watchdog_usec=None)
    services.append(service)
    return service


def metrics_file(device: Device) -> Path:
    return device.tmp_path / "devid-agent.prom"


def metrics(device: Device) -> Metrics:
    out: Metrics = {}
    path = metrics_file(device)
    if not path.exists():
        return out
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            out.setdefault(sample.name.removeprefix("devid_agent_"), []).append(
                (dict(sample.labels), sample.value)
            )
    return out


def sample(m: Metrics, name: str, **labels: str) -> float | None:
    for got, v in m.get(name, []):
        if all(got.get(k) == want for k, want in labels.items()):
            return v
    return None


def refreshes(device: Device, result: str) -> float:
    return sample(metrics(device), "ca_refreshes_total", result=result) or 0


def audit(device: Device, event: str) -> list[dict[str, object]]:
    path = device.state_dir / "audit.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if r["event"] == event]


def stored(device: Device) -> tuple[bytes, bytes]:
    return (device.state_dir / "cacerts.pem").read_bytes(), (
        device.state_dir / "est-server.json"
    ).read_bytes()


def test_a_refresh_that_finds_the_same_set_changes_nothing_and_the_metrics_say_so(
    device: Device, notify: Notifications, services: list[Service]
) -> None:
    service = start(device, notify, services)  # not enrolled: the service enrolls first
    # the first refresh comes after the enrollment has written everything (one thread)
    wait_for(lambda: refreshes(device, "same") >= 1, "a refresh after the enrollment", service)
    assert current(device) == 1
    before = stored(device)
    wait_for(lambda: refreshes(device, "same") >= 3, "two more refreshes, the same set", service)
    assert service.stop() == 0
    assert stored(device) == before  # byte for byte
    assert audit(device, "ca_changed") == [] and audit(device, "ca_refused") == []
    anonymous = [r for r in device.est.records if r.operation == "cacerts" and not r.client_cert]
    assert len(anonymous) >= 2  # the refresh presents no client certificate (no TPM object)

    path = metrics_file(device)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    m = metrics(device)
    cert = x509.load_pem_x509_certificate(
        (device.state_dir / "identity" / "current" / "cert.pem").read_bytes()
    )
    assert sample(m, "build_info", version=__version__) == 1
    assert (
        sample(m, "certificate_not_after_timestamp_seconds") == cert.not_valid_after_utc.timestamp()
    )
    assert sample(m, "renewal_attempts_total", action="enroll", disposition="ok") == 1
    assert sample(m, "renewal_last_success_timestamp_seconds") is not None
    next_at = sample(m, "renewal_next_timestamp_seconds", action="renew")
    assert next_at is not None and next_at > cert.not_valid_before_utc.timestamp()
    anchor = x509.load_pem_x509_certificate(device.est.ca_file.read_bytes())
    assert (
        sample(m, "trust_anchor_not_after_timestamp_seconds")
        == anchor.not_valid_after_utc.timestamp()
    )
    assert sample(m, "ca_certificates_not_after_timestamp_seconds") is not None
    assert sample(m, "commands_refused_total") == 0
    assert sample(m, "ca_changes_total") == 0
    assert sample(m, "ca_refresh_consecutive_failures") == 0
    assert sample(m, "clock_trusted") == 1
    assert "channel_connected" not in m  # no MQTT component: not known, so not written


def test_a_rolled_over_ca_is_stored_announced_and_the_next_renewal_chains_to_it(
    device: Device, notify: Notifications, services: list[Service]
) -> None:
    assert device.run("enroll").code == 0
    old_set = stored(device)[0]
    new_root, new_with_old, old_with_new = device.est.rollover()
    service = start(device, notify, services)
    wait_for(lambda: bool(audit(device, "ca_changed")), "the ca_changed audit entry", service)
    [changed] = audit(device, "ca_changed")
    assert changed["old_sha256"] != changed["new_sha256"] and changed["count"] == 4
    assert changed["new_roots"] == fingerprint(new_root)
    now_stored = x509.load_pem_x509_certificates(stored(device)[0])
    assert set(now_stored) == {
        new_root,
        new_with_old,
        old_with_new,
        device.est.previous_cas[0].cert,
    }
    assert stored(device)[0] != old_set
    assert "the EST CA set changed" in service.text()
    wait_for(
        lambda: sample(metrics(device), "ca_changes_total") == 1, "ca_changes_total 1", service
    )

    # renew now (a reload with a renewal window already passed): the new root issues, and the
    # stored set validates it without fetching /cacerts during the renewal
    service_config(device, window=0.5)
    service.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: (current(device) or 0) >= 2, "the renewal under the new root", service)
    assert service.stop() == 0
    cert = x509.load_pem_x509_certificate(
        (device.state_dir / "identity" / "current" / "cert.pem").read_bytes()
    )
    cert.verify_directly_issued_by(new_root)  # the new key signed it
    assert "/cacerts not fetched (stored CA set)" in service.text()
    chain = (device.state_dir / "identity" / "current" / "chain.pem").read_bytes()
    assert pem(new_root) in chain or pem(new_with_old) in chain


def test_a_set_that_does_not_chain_is_refused_and_the_stored_one_kept_byte_for_byte(
    device: Device, notify: Notifications, services: list[Service]
) -> None:
    assert device.run("enroll").code == 0
    before = stored(device)
    device.est.cacerts_answer = [device.est.rogue_ca.cert]
    service = start(device, notify, services)
    wait_for(lambda: bool(audit(device, "ca_refused")), "the ca_refused audit entry", service)
    wait_for(lambda: refreshes(device, "refused") >= 1, "the refusal in the metrics", service)
    assert service.stop() == 0
    assert stored(device) == before
    [refused] = audit(device, "ca_refused")[:1]
    assert refused["disposition"] == "security_event" and "chains to the trust anchor" in str(
        refused["error"]
    )
    assert "CA refresh refused the EST CA set" in service.text()
    assert audit(device, "ca_changed") == []


def test_a_refresh_failing_backs_off_and_says_why(
    device: Device, notify: Notifications, services: list[Service]
) -> None:
    assert device.run("enroll").code == 0
    before = stored(device)
    device.est.stop()  # the server is down: refused connections
    service_config(device, window=0.5)  # and a renewal due: it fails too
    service = Service(device, notify, watchdog_usec=None)
    services.append(service)

    def failing_twice() -> bool:
        m = metrics(device)
        renewals = sum(v for _, v in m.get("renewal_failures_total", []))
        return (sample(m, "ca_refresh_consecutive_failures") or 0) >= 2 and renewals >= 2

    wait_for(failing_twice, "two failed refreshes in a row", service)
    m = metrics(device)
    upcoming = sample(m, "ca_refresh_next_timestamp_seconds")
    assert upcoming is not None
    assert service.stop() == 0
    assert stored(device) == before
    assert "CA refresh failed (" in service.text()
    assert sample(m, "ca_refreshes_total", result="failed") == sample(
        m, "ca_refresh_consecutive_failures"
    )
    [(labels, _)] = m["renewal_failures_total"]
    assert labels["action"] == "renew" and labels["disposition"] == "retry_later"  # refused
    attempts = sample(m, "renewal_attempts_total", **labels)
    assert attempts == sample(m, "renewal_failures_total", action="renew")
    assert sample(m, "renewal_consecutive_failures") == attempts
