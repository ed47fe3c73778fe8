"""The service's attempt process (agent/attempt_process.py, agent/attempt_worker.py): real
children against the real EST server and swtpm; what travels between them is checked both ways,
and the long-lived process never imports the TPM stack or the enrollment code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.attempt_process import AttemptProcess, parse_answer, request_document
from agent.attempt_worker import read_request
from agent.clock import Interrupt
from agent.config import load_config, parse_config
from agent.errors import Busy, Kind, Reported, classify
from agent.status import KeyNotChecked
from agent.wiring import identity_store
from hal.interfaces import KeyAlgorithm
from hal.tpm import TpmKeyStore
from tests.conftest import ROOT
from tests.support.device import Device
from tests.test_enroll_powercut import check_current


def attempts(device: Device, interrupt: Interrupt | None = None) -> AttemptProcess:
    config = load_config(device.config)
    return AttemptProcess(config=config, identities=identity_store(config), interrupt=interrupt)


def children() -> set[int]:
    """This process's live children (pids, swtpm's among them), from /proc."""
    found: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        found.update(int(p) for p in (task / "children").read_text().split())
    return found


# -- what travels between the two processes ------------------------------------------------------

FAILED = b'{"protocol": 1, "ok": false, "message": "x", "kind": "wait_until", '
OK = b'{"protocol": 1, "ok": true, "generation": 1, "changed": true, '


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "ended without an answer"),
        (b"  \n", "ended without an answer"),
        (b"{not json", "answered with no JSON"),
        (b"[" * 100_000, "answered with no JSON"),
        (b'{"protocol": 2, "ok": true}', "in another protocol"),
        (b"[]", "in another protocol"),
        (b'{"protocol": 1}', "malformed fields"),
        (b'{"protocol": 1, "ok": true}', "malformed fields"),
        (b'{"protocol": 1, "ok": true, "generation": "2", "changed": true}', "malformed fields"),
        (b'{"protocol": 1, "ok": true, "certificates": [1]}', "malformed fields"),
        (b'{"protocol": 1, "ok": false, "message": "x", "kind": "nope"}', "malformed fields"),
        (b'{"protocol": 1, "ok": false, "message": 3, "kind": "config"}', "malformed fields"),
        (FAILED + b'"wait_seconds": NaN}', "malformed fields"),
        (FAILED + b'"wait_seconds": true}', "malformed fields"),
        (OK + b'"crash_points": "1"}', "malformed fields"),
    ],
)
def test_a_malformed_answer_is_an_internal_failure_that_names_it(data: bytes, says: str) -> None:
    with pytest.raises(Reported) as raised:
        parse_answer(data, -9)
    assert says in str(raised.value) and "killed by SIGKILL" in str(raised.value)
    assert classify(raised.value).kind is Kind.INTERNAL


def test_a_well_formed_answer_is_taken_as_it_is() -> None:
    ok = parse_answer(b'{"protocol": 1, "ok": true, "generation": 4, "changed": false}\n', 0)
    assert ok == {"protocol": 1, "ok": True, "generation": 4, "changed": False}
    failed = parse_answer(
        b'{"protocol": 1, "ok": false, "message": "m", "kind": "wait_until", '
        b'"wait_seconds": 30}', 0
    )  # fmt: skip
    assert failed["wait_seconds"] == 30 and failed["kind"] == "wait_until"


def _request(**changes: object) -> bytes:
    request = json.loads(request_document(parse_config('[device]\nid = "gw"\n'), "renew"))
    request.update(changes)
    return json.dumps({k: v for k, v in request.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"{", "Expecting"),
        (b"[]", "not a request of this protocol"),
        (_request(protocol=7), "not a request of this protocol"),
        (_request(action="format-disk"), "action: 'format-disk' is not one of"),
        (_request(action=...), "action: missing"),
        (_request(config=None), "config: missing or not a str"),
        (_request(broker_connected="yes"), "broker_connected: missing or not a bool"),
        (_request(parent="1"), "parent: missing or not a int"),
        (_request(action="cacerts"), "anchor: missing for cacerts"),
        (_request(anchor=5), "anchor: not a path"),
        (b" " * (3 * 1024 * 1024), "request larger than"),
    ],
)
def test_the_worker_refuses_a_malformed_request_naming_what(data: bytes, says: str) -> None:
    with pytest.raises(ValueError, match=None) as raised:
        read_request(data)
    assert says in str(raised.value)


def test_a_worker_whose_service_is_gone_does_nothing(device: Device) -> None:
    request = json.loads(request_document(load_config(device.config), "enroll"))
    request["parent"] = 1  # not its parent: the service that asked is gone
    done = subprocess.run(
        [sys.executable, "-P", "-m", "agent.attempt_worker"], input=json.dumps(request).encode(),
        cwd=ROOT, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 3 and done.stdout == b""
    assert b"the service that asked (pid 1) is gone" in done.stderr
    assert not (device.state_dir / "identity").exists()  # nothing enrolled


# -- real attempts ---------------------------------------------------------------------------------


def test_enroll_then_renew_each_in_a_child_with_a_new_tpm_key(device: Device) -> None:
    process = attempts(device)
    others = children()
    enrolled = process.enroll()
    assert enrolled.changed and enrolled.identity.generation == 1
    again = process.enroll()  # a valid identity is left alone
    assert not again.changed and again.identity.generation == 1
    renewed = process.renew()
    assert renewed.changed and renewed.identity.generation == 2
    assert enrolled.identity.key_file.read_bytes() != renewed.identity.key_file.read_bytes()
    check_current(device, required=True)  # whole, loads and signs, nothing left in the TPM
    assert children() == others


def test_a_failure_comes_back_with_the_disposition_the_child_gave_it(device: Device) -> None:
    process = attempts(device)
    process.enroll()
    device.est.options.fault = "5xx"
    with pytest.raises(Reported) as raised:
        process.renew()
    assert "HTTP 500" in str(raised.value)
    assert classify(raised.value).kind is Kind.RETRY_LATER
    device.est.options.fault = None
    device.est.options.pending = 1
    device.est.options.retry_after = "120"
    with pytest.raises(Reported) as pending:
        process.renew()
    disposition = classify(pending.value)
    assert disposition.kind is Kind.WAIT_UNTIL and disposition.wait_seconds == 120
    assert identity_store(load_config(device.config)).current_generation() == 1  # kept


def test_cacerts_are_fetched_by_a_child(device: Device) -> None:
    process = attempts(device)
    certs = process.fetch_cacerts(device.est.ca_file)
    assert [c.subject for c in certs] == [device.est.ca.cert.subject]
    device.est.options.tls_fault = "rogue-ca"  # the server is no longer the one the anchor names
    with pytest.raises(Reported) as raised:
        process.fetch_cacerts(device.est.ca_file)
    assert classify(raised.value).kind is Kind.SECURITY_EVENT  # as it would be in the service
    assert "is not trusted" in str(raised.value)


def test_the_key_check_runs_in_a_child_and_a_success_vouches_for_a_while(device: Device) -> None:
    process = attempts(device)
    identity = process.enroll().identity  # the attempt proved the key: vouched for
    key = identity.key_file
    good = key.read_bytes()
    other = TpmKeyStore(tcti=device.tpm.tcti).generate(KeyAlgorithm.EC_P256)
    key.write_bytes(other)
    process.check_key(identity)  # vouched for by the enrollment: no child asked
    fresh = attempts(device)  # no proof yet: a child checks, and finds the wrong key
    with pytest.raises(Reported) as raised:
        fresh.check_key(identity)
    assert "does not sign for" in str(raised.value) and "not the certificate's key" in str(
        raised.value
    )
    with pytest.raises(Reported):
        fresh.check_key(identity)  # a failure is not remembered: checked again
    key.write_bytes(good)
    fresh.check_key(identity)  # repaired: the next check says so
    key.write_bytes(other)
    fresh.check_key(identity)  # ...and vouches for KEY_CHECK_SECONDS
    key.write_bytes(good)


def test_while_an_attempt_works_the_tpm_is_its_alone(device: Device) -> None:
    """One child at a time: the key check says "not checked" and /cacerts waits (Busy)."""
    process = attempts(device)
    identity = process.enroll().identity
    device.est.options.fault = "hang"
    device.est.options.hang_seconds = 30
    running = process.start("renew")
    assert device.est.hang_started.wait(60)
    process._key_vouched = None  # as KEY_CHECK_SECONDS after the last proof
    with pytest.raises(KeyNotChecked):
        process.check_key(identity)
    with pytest.raises(Busy) as busy:
        process.fetch_cacerts(device.est.ca_file)
    assert "at work (renew): cacerts later" in str(busy.value)
    with pytest.raises(Busy):
        process.start("renew")
    running.stop()  # as the service's stop does
    while not running.pump():
        time.sleep(0.05)
    with pytest.raises(Reported) as stopped:
        running.outcome()
    assert "interrupted: the service is stopping" in str(stopped.value)
    device.est.options.fault = None
    process.check_key(identity)  # the TPM is free again: checked by a child
    assert process.renew().identity.generation == 2


def test_the_service_stopping_ends_a_hanging_attempt_at_once(device: Device) -> None:
    interrupt = Interrupt()
    process = attempts(device, interrupt)
    process.enroll()
    others = children()
    device.est.options.fault = "hang"
    device.est.options.hang_seconds = 30

    def stop_when_hanging() -> None:
        device.est.hang_started.wait(60)
        interrupt.trip()  # as SIGTERM to the service does

    threading.Thread(target=stop_when_hanging, daemon=True).start()
    with pytest.raises(Reported) as raised:
        process.renew()
    assert device.est.hang_started.is_set()
    assert classify(raised.value).kind is Kind.RETRY_LATER, raised.value
    assert "interrupted: the service is stopping" in str(raised.value)
    assert children() == others
    check_current(device, required=True)  # the old identity whole, nothing left in the TPM


def test_a_child_killed_mid_renewal_is_an_internal_failure_and_loses_nothing(
    device: Device,
) -> None:
    device.configure(store="software")  # a killed process's TPM objects stay on a bare swtpm
    process = attempts(device)
    process.enroll()
    before = {p: p.read_bytes() for p in (device.state_dir / "identity").rglob("*") if p.is_file()}
    device.est.options.fault = "hang"
    device.est.options.hang_seconds = 30

    others = children()

    def kill_the_child() -> None:
        device.est.hang_started.wait(60)
        for pid in children() - others:
            os.kill(pid, signal.SIGKILL)

    threading.Thread(target=kill_the_child, daemon=True).start()
    with pytest.raises(Reported) as raised:
        process.renew()
    assert "killed by SIGKILL" in str(raised.value) and "without an answer" in str(raised.value)
    assert classify(raised.value).kind is Kind.INTERNAL
    after = {p: p.read_bytes() for p in (device.state_dir / "identity").rglob("*") if p.is_file()}
    assert after == before
    device.est.options.fault = None
    assert process.renew().identity.generation == 2  # the next attempt finishes the job


def _with_child(device: Device, argv: tuple[str, ...], *, timeout: float = 2) -> AttemptProcess:
    """An AttemptProcess whose child is `argv` (a fault at the edge: a child that misbehaves)."""
    with device.config.open("a") as f:
        f.write(f"[renewal]\nattempt_timeout_seconds = {timeout}\n")
    config = load_config(device.config)
    return AttemptProcess(config=config, identities=identity_store(config), argv=argv,
                          stop_grace_seconds=0.5)  # fmt: skip


def test_a_child_that_cannot_start_is_a_local_fault(device: Device) -> None:
    process = _with_child(device, ("/nonexistent/python",))
    with pytest.raises(Reported) as raised:
        process.start("renew")
    assert "cannot start the attempt process /nonexistent/python" in str(raised.value)
    assert classify(raised.value).kind is Kind.LOCAL_FAULT
    assert not process.busy


@pytest.mark.parametrize(
    "script",
    ["exec sleep 60", "trap '' TERM; exec sleep 60"],  # ends on SIGTERM; ignores it: killed
    ids=["ends-on-sigterm", "ignores-sigterm"],
)
def test_a_child_past_its_deadline_is_stopped_and_its_attempt_failed(
    device: Device, script: str
) -> None:
    process = _with_child(device, ("/bin/sh", "-c", script))
    others = children()
    with pytest.raises(Reported) as raised:
        process.renew()
    assert str(raised.value) == "the attempt process (renew) took longer than 2 s and was stopped"
    assert classify(raised.value).kind is Kind.RETRY_LATER
    assert not process.busy and children() <= others  # reaped


def test_the_long_lived_process_never_imports_the_tpm_stack_or_the_enrollment_code(
    device: Device,
) -> None:
    """The service's parts built and used as the service uses them (an enrollment, a renewal,
    /cacerts, the key check, a status answer), in a fresh interpreter."""
    device.configure(store="tpm")
    script = f"""
import sys
from agent.config import load_config
from agent.wiring import daemon_parts, control_status_answer
config = load_config(__import__("pathlib").Path({str(device.config)!r}))
parts = daemon_parts(config)
parts.enroller.enroll()
identity = parts.enroller.renew().identity
parts.enroller.fetch_cacerts(__import__("pathlib").Path({str(device.est.ca_file)!r}))
parts.enroller._key_vouched = None
parts.enroller.check_key(identity)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tpm2_pytss", "pyasn1",
    "pyasn1_modules", "requests") or m in ("agent.enroll", "agent.est.client", "hal.tpm",
    "agent.est.csr", "agent.est.csrattrs"))
print(" ".join(heavy) or "none")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "none"
    assert identity_store(load_config(device.config)).current_generation() == 2
