# ruff: noqa: F811 - the fixtures of tests/test_daemon.py, imported by name, are parameters here
"""Server faults against `devid-agent run` as a real process (swtpm, the test EST server, a test
NOTIFY_SOCKET), as tests/test_daemon.py runs it: a 202 with Retry-After, a certificate for
another key, a CA that changed, a device booting at 1970, SIGTERM while a request hangs.

Waits poll for a condition with a generous deadline (a deadline only turns a hang into a
failure); nothing asserts how fast anything is. The one exception is by design: the stop while
a request hangs must end well before the request's own timeout, which is set far beyond the
process wait that bounds the test.
"""

from __future__ import annotations

import os
import signal
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tests.support.device import Device
from tests.support.enroll_env import snapshot
from tests.support.service import Notifications, Service, configure, current, state, wait_for
from tests.test_daemon import device, est  # noqa: F401 - fixtures


def _time(value: object) -> datetime:
    return datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def identity_files(device: Device) -> dict[str, tuple[int, bytes]]:
    return snapshot(device.state_dir / "identity")


def start(device: Device, notify: Notifications, services: list[Service], **env: str) -> Service:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        service = Service(device, notify, watchdog_usec=200_000)  # a turn at least every 0.1 s
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    services.append(service)
    return service


def test_a_202_with_retry_after_is_waited_for_clamped_then_the_same_request_rotates(
    device: Device, notify: Notifications, services: list[Service]
) -> None:
    # a longer lifetime than the others': a Retry-After is honoured unless the certificate
    # would expire first (within renewal's expiry margin, 60 s); renewing 3 s after the issue
    device.est.options.cert_lifetime_seconds = 600
    device.configure(retry_after_max_seconds=3)  # the server asks for a day: 3 s it is
    configure(device, window_start_fraction=0.105, window_end_fraction=0.105)
    assert device.run("enroll").code == 0
    device.est.options.pending = 1  # one 202 per key, then the certificate
    device.est.options.retry_after = "86400"
    service = start(device, notify, services)
    wait_for(lambda: state(device).get("last_disposition") == "wait_until", "the 202", service)
    parked = state(device)
    asked = _time(parked["retry_after_until"])
    assert asked <= _time(parked["last_attempt"]) + timedelta(seconds=3 + 1)  # clamped
    wait_for(lambda: (current(device) or 0) >= 2, "the rotation after the wait", service)
    assert service.stop() == 0
    renewals = [r for r in device.est.records if r.operation == "simplereenroll"]
    assert [r.status for r in renewals[:2]] == [202, 200]
    assert renewals[1].at >= asked  # not before the (clamped) Retry-After
    assert renewals[1].csr == renewals[0].csr  # the request that was parked, resubmitted
    assert "renew: the server asked us to come back (Retry-After)" in service.text()


def _refused_as_security_event(
    device: Device, notify: Notifications, services: list[Service], fault: str, message: str
) -> Service:
    configure(device)
    assert device.run("enroll").code == 0
    before = identity_files(device)
    device.est.options.fault = fault
    service = start(device, notify, services)

    def refused_twice() -> bool:
        s = state(device)
        return int(s.get("failures", 0)) >= 2 and s.get("last_disposition") == "security_event"  # type: ignore[call-overload]

    wait_for(refused_twice, "two refused renewals", service)
    refused = state(device)
    assert message in str(refused["last_error"]) and refused["last_failure"] == "security"
    assert current(device) == 1 and identity_files(device) == before  # the old identity, as it was
    # the backoff: the policy's maximum, said where the attempt is logged
    wait_for(
        lambda: "a security failure: waiting the maximum" in service.text(), "the max", service
    )
    statuses = [m for m in notify.lines() if m.startswith("STATUS=") and "failing" in m]
    assert statuses and message in statuses[-1]  # reported in the service's status
    assert service.stop() == 0
    assert identity_files(device) == before
    return service


def test_a_certificate_for_another_key_is_a_security_event_and_the_old_identity_stays(
    device: Device, notify: Notifications, services: list[Service]
) -> None:
    _refused_as_security_event(device, notify, services, "other-key", "for another key")


def test_a_ca_that_changed_is_refused_and_the_old_identity_stays(
    device: Device, notify: Notifications, services: list[Service]
) -> None:
    """Between enroll and renew the server started signing with another CA, which does not
    chain to the EST CA certificates the device trusts: /cacerts is asked once more (a CA
    rollover would be seen there), then the certificate is refused."""
    _refused_as_security_event(
        device, notify, services, "wrong-issuer", "does not chain to the EST CA"
    )
    renewal = [r.operation for r in device.est.records if r.client_cert == "commonName=gw-0001"]
    assert renewal[:2] == ["simplereenroll", "cacerts"]


def test_a_clock_at_1970_is_not_believed_until_it_is_set(
    device: Device, notify: Notifications, services: list[Service], tmp_path: Path
) -> None:
    """A device without an RTC boots at 1970 (hal.faults' test clock offset); the service
    calls nothing expired or not yet valid and sends nothing; once the clock is set (the offset
    back to 0, as NTP would) it carries on with the renewal that is due."""
    configure(device)
    assert device.run("enroll").code == 0
    before = identity_files(device)
    requests = len(device.est.records)
    offset = tmp_path / "clock-offset"
    epoch_day = datetime(1970, 1, 2, tzinfo=timezone.utc)
    set_offset(offset, (epoch_day - datetime.now(timezone.utc)).total_seconds())
    service = start(device, notify, services, DEVID_AGENT_TEST_CLOCK_OFFSET_FILE=str(offset))
    waiting = "STATUS=waiting for a trustworthy clock: the system clock (1970-01-0"

    def seen_waiting() -> bool:
        return any(m.startswith(waiting) for m in notify.lines())

    wait_for(seen_waiting, "the wait for a trustworthy clock", service)
    wait_for(lambda: notify.lines().count("WATCHDOG=1") >= 5, "a few turns", service)
    assert len(device.est.records) == requests  # nothing sent
    assert identity_files(device) == before  # nothing called not yet valid and replaced
    assert "not yet valid" not in service.text() and "expired" not in service.text()
    set_offset(offset, 0)
    wait_for(lambda: (current(device) or 0) >= 2, "the renewal once the clock is set", service)
    assert service.stop() == 0


def set_offset(path: Path, seconds: float) -> None:
    temporary = path.with_suffix(".new")
    temporary.write_text(f"{seconds:.3f}\n")
    temporary.rename(path)  # the service never reads half a number


def test_sigterm_ends_a_hanging_request_at_once_and_leaves_the_identity(
    device: Device, notify: Notifications, services: list[Service]
) -> None:
    device.configure(read_timeout_seconds=600)  # far beyond the stop's bound below
    configure(device)
    assert device.run("enroll").code == 0
    before = identity_files(device)
    device.est.options.fault = "hang"
    device.est.options.hang_seconds = 600
    service = start(device, notify, services)
    wait_for(device.est.hang_started.is_set, "a renewal hanging at the server", service)
    assert service.stop(signal.SIGTERM, timeout=60) == 0  # not the 600 s read timeout
    assert identity_files(device) == before
    stopped = state(device)
    assert "interrupted: the service is stopping" in str(stopped["last_error"]), stopped
    assert notify.lines()[-1] == "STOPPING=1"
