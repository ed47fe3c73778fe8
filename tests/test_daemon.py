"""`devid-agent run` as a real process: swtpm, the test EST server issuing short-lived
certificates, a datagram socket standing in for systemd's NOTIFY_SOCKET.

Waits poll for a condition with a generous deadline (a deadline only turns a hang into a
failure); nothing asserts how fast anything is.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography import x509

from hal.tpm import transient_objects
from tests.support.device import Device
from tests.support.est_server import EstOptions, EstServer
from tests.support.service import (
    LIFETIME,
    Notifications,
    Service,
    configure,
    current,
    generations,
    state,
    wait_for,
)
from tests.support.swtpm import Swtpm


@pytest.fixture
def est(tmp_path: Path) -> Iterator[EstServer]:
    with EstServer(tmp_path / "est", EstOptions(cert_lifetime_seconds=LIFETIME)) as server:
        yield server


@pytest.fixture
def device(tmp_path: Path, swtpm: Swtpm, est: EstServer) -> Device:
    d = Device(tmp_path, swtpm, est)
    d.basic()  # the bootstrap credential
    return d


def test_the_service_enrolls_then_rotates_by_itself_with_new_keys_and_stops_cleanly(
    device: Device, notify: Notifications, services: list[Service]
) -> None:
    configure(device)
    service = Service(device, notify, watchdog_usec=1_000_000)
    services.append(service)
    wait_for(lambda: (current(device) or 0) >= 4, "three rotations after the enrollment", service)
    assert service.stop() == 0
    lines = notify.lines()
    assert lines[0] == "READY=1" and lines[-1] == "STOPPING=1"
    assert any(line.startswith("STATUS=identity generation") and " in " in line for line in lines)
    assert "WATCHDOG=1" in lines
    keys = set()
    kept = generations(device)  # older ones are pruned (est.generations_kept)
    assert len(kept) >= 3
    for n in kept:
        cert = x509.load_pem_x509_certificate(
            (device.state_dir / "identity" / f"gen-{n}" / "cert.pem").read_bytes()
        )
        keys.add(cert.public_key().public_numbers())  # type: ignore[union-attr]
        assert (device.state_dir / "identity" / f"gen-{n}" / "key.tss2.pem").exists()
    assert len(keys) == len(kept)  # a new TPM key every time
    operations = [(r.operation, r.client_cert) for r in device.est.records]
    renewals = [op for op in operations if op[0] == "simplereenroll"]
    proofs = [op for op in operations if op == ("cacerts", "commonName=gw-0001")]
    assert len(renewals) >= 3 and len(proofs) >= len(renewals)  # each new identity proved itself
    assert state(device)["failures"] == 0 and state(device)["last_success"]
    assert transient_objects(device.tpm.tcti)[0] == 0  # nothing left loaded in the TPM


def test_failures_back_off_survive_a_kill_and_the_next_start_finishes_the_job(
    device: Device, notify: Notifications, services: list[Service]
) -> None:
    configure(device)
    assert device.run("enroll").code == 0
    device.est.options.fault = "5xx"
    service = Service(device, notify, watchdog_usec=None)
    services.append(service)

    def two_failures_seen() -> bool:
        s = state(device)
        return int(s.get("failures", 0)) >= 2 and "HTTP 500" in str(s.get("last_error"))

    wait_for(two_failures_seen, "two failed renewals", service)
    failed = state(device)
    assert failed["last_disposition"] in ("retry_later", "retry_soon", "bad_response")
    assert "HTTP 500" in str(failed["last_error"])
    # a renewal in flight when the process dies still counts: it was recorded before the request
    device.est.options.fault = "hang"
    device.est.options.hang_seconds = 30
    wait_for(device.est.hang_started.is_set, "a renewal in flight", service)
    in_flight = state(device)
    service.stop(signal.SIGKILL)
    assert current(device) == 1  # the old identity, whole
    device.est.options.fault = None
    restarted = Service(device, notify, watchdog_usec=None)
    services.append(restarted)
    wait_for(lambda: (current(device) or 0) >= 2, "the renewal after the restart", restarted)
    assert restarted.stop() == 0
    done = state(device)
    assert done["failures"] == 0 and int(in_flight["failures"]) >= 3  # type: ignore[call-overload]
    assert done["last_success"] is not None


def test_a_renewal_whose_process_dies_is_a_failure_and_the_service_goes_on(
    device: Device, notify: Notifications, services: list[Service]
) -> None:
    """agent/attempt_process.py: the attempt's child is killed mid-renewal (a crash or the OOM
    killer would do the same); the service lives on, records an internal failure and the next
    attempt rotates. Software keys: on a bare swtpm a killed process's objects stay loaded."""
    device.configure(store="software")
    configure(device)
    assert device.run("enroll").code == 0
    device.est.options.fault = "hang"
    device.est.options.hang_seconds = 30
    service = Service(device, notify, watchdog_usec=None)
    services.append(service)
    wait_for(device.est.hang_started.is_set, "a renewal in flight", service)
    task = Path(f"/proc/{service.proc.pid}/task")
    (child,) = {int(p) for t in task.iterdir() for p in (t / "children").read_text().split()}
    device.est.options.fault = None
    os.kill(child, signal.SIGKILL)

    def failure_recorded() -> bool:
        s = state(device)
        return s.get("last_disposition") == "internal" and "SIGKILL" in str(s.get("last_error"))

    wait_for(failure_recorded, "the killed attempt recorded as a failure", service)
    assert current(device) == 1  # the old identity, whole
    wait_for(lambda: (current(device) or 0) >= 2, "the next attempt's rotation", service)
    assert service.proc.poll() is None  # the same service all along
    assert service.stop() == 0
    assert "the attempt process (killed by SIGKILL) ended without an answer" in service.text()


def test_sighup_reloads_and_an_invalid_config_is_refused_and_the_old_one_kept(
    device: Device, notify: Notifications, services: list[Service]
) -> None:
    configure(device, window_start_fraction=0.9, window_end_fraction=0.9)  # no renewal soon
    service = Service(device, notify, watchdog_usec=None)
    services.append(service)
    wait_for(lambda: current(device) == 1, "the enrollment", service)
    good = device.config.read_text()
    device.config.write_text(good + "[renewal]\nretry_min_seconds = 'soon'\n")
    service.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in service.text(), "the refusal", service)
    refusal = next(line for line in service.text().splitlines() if "reload refused" in line)
    assert "config.toml" in refusal  # one line naming the file and what was wrong
    device.config.write_text(good)
    service.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in service.text(), "the reload", service)
    assert service.stop() == 0
    lines = notify.lines()
    assert lines.count("RELOADING=1") == 2 and lines.count("READY=1") == 3


def test_a_hanging_attempt_is_stopped_at_its_deadline_and_the_loop_pings_meanwhile(
    device: Device, notify: Notifications, services: list[Service]
) -> None:
    """The attempt works in its own process: while it hangs at the server the loop goes on
    (watchdog pings, components); past renewal.attempt_timeout_seconds it is stopped (SIGTERM:
    it ends its request and flushes its TPM objects), counted as a failure, and the next
    attempt rotates."""
    configure(device)
    with device.config.open("a") as f:
        f.write("attempt_timeout_seconds = 3\n")  # [renewal] is the last table
    assert device.run("enroll").code == 0
    device.est.options.fault = "hang"
    device.est.options.hang_seconds = 60
    service = Service(device, notify, watchdog_usec=200_000)  # a ping every 0.1 s
    services.append(service)
    wait_for(device.est.hang_started.is_set, "the renewal hanging at the server", service)
    hanging_seen = time.monotonic()
    device.est.options.fault = None  # the next attempt goes through

    failed = "renew failed (retry_later): the attempt process (renew) took longer than 3 s and "
    wait_for(lambda: failed in service.text(), "the hanging attempt stopped at its deadline",
             service)  # fmt: skip
    killed_seen = time.monotonic()
    pings = [t for t, m in list(notify.messages) if m == "WATCHDOG=1"]
    assert any(hanging_seen < t < killed_seen for t in pings)  # the loop went on meanwhile
    wait_for(lambda: (current(device) or 0) >= 2, "a renewal after the stop", service)
    assert service.stop() == 0
    assert transient_objects(device.tpm.tcti)[0] == 0  # the stopped child flushed its own


def test_a_stuck_loop_stops_the_watchdog_pings(
    device: Device, notify: Notifications, services: list[Service]
) -> None:
    """A step of the loop itself that hangs (here a post-rotate hook, which runs in the loop)
    stops the pings, so systemd's watchdog would restart the service."""
    sleep = shutil.which("sleep")
    assert sleep is not None
    configure(device)
    text = device.config.read_text().replace(
        "[renewal]\n", f'[hooks]\npost_rotate = [["{sleep}", "3"]]\n[renewal]\n', 1
    )
    device.config.write_text(text)
    assert device.run("enroll").code == 0
    service = Service(device, notify, watchdog_usec=200_000)  # a ping every 0.1 s
    services.append(service)
    wait_for(lambda: "post-rotate hook" in service.text(), "a rotation and its hook", service)
    assert service.stop() == 0
    pings = [t for t, m in list(notify.messages) if m == "WATCHDOG=1"]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) >= 2.9  # no ping while the hook held the loop for 3 s


def test_a_crash_at_every_point_of_a_rotation_leaves_a_whole_identity(
    device: Device, notify: Notifications, services: list[Service]
) -> None:
    """hal.faults: the service dies at crash point N (every write, fsync and rename of the
    identity store and the scheduler state) for N = 1, 2, ... until a run gets through a whole
    rotation. After each death `identity/current` is complete, its key loads and signs in the
    TPM, nothing is left loaded in the TPM, and the next start carries on."""
    from agent import wiring
    from agent.config import load_config
    from hal.faults import CRASH_EXIT, ENV
    from tests.test_enroll_powercut import check_current

    configure(device)
    assert device.run("enroll").code == 0
    points: list[str] = []
    for n in range(1, 200):
        before = state(device).get("last_success")
        os.environ[ENV] = str(n)
        try:
            service = Service(device, notify, watchdog_usec=None)
        finally:
            del os.environ[ENV]
        services.append(service)
        assert service.proc.wait(90) == CRASH_EXIT, service.text()[-2000:]
        service.out.close()
        points.append(service.text().strip().rsplit("crash point ", 1)[-1])
        check_current(device, required=True)  # whole, loads, signs, no TPM object left
        if state(device).get("last_success") != before:
            break  # this run recorded a whole rotation: every point of one has been cut
    else:
        raise AssertionError("no run got through a rotation")
    finished = Service(device, notify, watchdog_usec=None)
    services.append(finished)
    start = current(device) or 0
    wait_for(lambda: (current(device) or 0) > start, "a rotation after the crashes", finished)
    assert finished.stop() == 0
    store = wiring.identity_store(load_config(device.config))
    assert store.current() is not None
    kinds = {p.split(": ", 1)[-1].split()[0] for p in points}
    assert {"write", "fsync", "rename", "symlink"} <= kinds, points
    assert any("renewal-state.json" in p for p in points) and any("current" in p for p in points)


def test_an_expired_identity_is_re_bootstrapped_with_the_idevid(
    tmp_path: Path, swtpm: Swtpm, notify: Notifications, services: list[Service]
) -> None:
    with EstServer(tmp_path / "est2", EstOptions(cert_lifetime_seconds=62, auth="cert")) as est:
        device = Device(tmp_path, swtpm, est)
        device.idevid()  # the manufacturer's certificate, in this TPM
        assert device.run("enroll").code == 0
        first = x509.load_pem_x509_certificate(
            (device.state_dir / "identity" / "current" / "cert.pem").read_bytes()
        )
        while datetime.now(timezone.utc) <= first.not_valid_after_utc:  # 2 s of validity
            time.sleep(0.1)
        est.records.clear()
        service = Service(device, notify, watchdog_usec=None)
        services.append(service)
        wait_for(lambda: (current(device) or 0) >= 2, "the re-bootstrap", service)
        assert service.stop() == 0
        bootstrap = [r for r in est.records if r.operation == "simpleenroll"]
        assert bootstrap and bootstrap[0].client_cert == "commonName=idevid SN-0001"
        assert "bootstrap: expired: re-enrolling with the bootstrap credential" in service.text()


def test_tpm_status_over_socket(
    device: Device, notify: Notifications, services: list[Service]
) -> None:
    """The TPM service answers `status` over its control socket (the key check loads the TPM
    key inside the daemon and flushes it) and goes on rotating; `renew` goes through it."""
    configure(device)
    run_dir = device.tmp_path / "run"
    text = device.config.read_text().replace("[control]\nenabled = false\n", "")
    device.config.write_text(text.replace("[paths]\n", f'[paths]\nrun_dir = "{run_dir}"\n'))
    service = Service(device, notify, watchdog_usec=None)
    services.append(service)
    wait_for(lambda: (current(device) or 0) >= 2, "the enrollment and a rotation", service)
    for _ in range(3):
        done = device.run("status", "--json")
        assert done.code == 0, done.out + done.err
        model = json.loads(done.out)
        assert model["service"]["running"] is True
        assert model["identity"]["hardware_backed"] is True
        assert model["identity"]["key_usable"] is True
    before = current(device) or 0
    renewed = device.run("renew")
    assert renewed.code == 0 and "through the running service" in renewed.out, renewed.err
    assert (current(device) or 0) > before
    wait_for(lambda: (current(device) or 0) >= before + 2, "rotations after them", service)
    assert service.stop() == 0
    assert not (run_dir / "control.sock").exists()
    assert transient_objects(device.tpm.tcti)[0] == 0  # every status's key load was flushed
