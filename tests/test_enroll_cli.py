"""`devid-agent enroll` / `renew` end to end: the real CLI as a subprocess (which loads its own
tpm2 provider), a fresh swtpm, our EST server over HTTPS. Exit codes as the README lists them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.identity import LOCK_FILE_NAME
from hal.tpm import TpmKeyStore
from tests.conftest import ROOT
from tests.support import procs
from tests.support.device import Device
from tests.support.enroll_env import password_file, snapshot
from tests.support.est_server import EstServer


def enroll_records(est: EstServer) -> list[Any]:
    return [r for r in est.records if r.operation in ("simpleenroll", "simplereenroll")]


@pytest.mark.parametrize("auth", ["basic", "cert", "both"])
def test_enroll_and_renew_with_tpm_keys(device: Device, auth: str) -> None:
    device.est.options.auth = auth
    if auth in ("basic", "both"):
        device.basic()
    if auth in ("cert", "both"):
        device.idevid()
    first = device.run("enroll")
    assert first.code == 0, first.err
    assert "enrolled: generation 1" in first.out
    assert "subject:  CN=gw-0001" in first.out
    assert "issuer:   CN=devid test EST CA" in first.out
    assert "key:      TPM:" in first.out
    enroll = enroll_records(device.est)[-1]
    assert enroll.status == 200
    assert enroll.authorization == (auth != "cert")
    assert (enroll.client_cert == "commonName=idevid SN-0001") == (auth != "basic")
    second = device.run("renew")
    assert second.code == 0, second.err
    assert "renewed: generation 2" in second.out and "new key" in second.out
    renew = enroll_records(device.est)[-1]
    assert renew.operation == "simplereenroll" and renew.client_cert == "commonName=gw-0001"
    current = device.state_dir / "identity" / "current"
    assert os.readlink(current) == "gen-2"
    assert (current / "key.tss2.pem").read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY")
    assert (device.state_dir / "identity" / "gen-1").is_dir()  # previous generation kept


def test_proof_of_possession_over_tls12(device: Device) -> None:
    device.est.options.tls12_only = True
    device.est.options.pop_required = True
    assert device.run("enroll").code == 0
    result = device.run("renew", "--reuse-key")
    assert result.code == 0, result.err
    assert "TLSv1.2, same key, proof-of-possession" in result.out
    assert all(r.challenge_password for r in enroll_records(device.est))


def test_enroll_is_idempotent(device: Device) -> None:
    assert device.run("enroll").code == 0
    contacted = len(device.est.records)
    again = device.run("enroll")
    assert again.code == 0 and "already enrolled (use --force)" in again.out
    assert len(device.est.records) == contacted
    forced = device.run("enroll", "--force")
    assert forced.code == 0 and "generation 2" in forced.out


def test_retry_after_across_a_restart(device: Device) -> None:
    device.est.options.pending = 1
    device.est.options.retry_after = "1"
    first = device.run("enroll")
    assert first.code == 75, first.err
    assert "HTTP 202" in first.err
    pending = device.state_dir / "est-pending.json"
    assert pending.stat().st_mode & 0o777 == 0o600
    retry_at = json.loads(pending.read_text())["retry_at"]
    # Power cycle: the TPM comes back (on a new port), the agent runs again too early.
    device.tpm.restart()
    device.configure()
    contacted = len(device.est.records)
    early = device.run("enroll")
    assert early.code == 75 and "not contacting the server" in early.err
    assert len(device.est.records) == contacted
    wait = (datetime.fromisoformat(retry_at) - datetime.now(timezone.utc)).total_seconds()
    time.sleep(max(0.0, wait) + 0.05)
    done = device.run("enroll")
    assert done.code == 0, done.err
    first_csr, second_csr = (r.csr for r in enroll_records(device.est))
    assert first_csr == second_csr  # the same request, resubmitted
    assert not pending.exists()


def test_fingerprint_bootstrap(device: Device) -> None:
    device.configure(trust_anchor="", bootstrap_fingerprint_sha256=device.est.ca_fingerprint)
    result = device.run("enroll")
    assert result.code == 0, result.err
    assert (device.state_dir / "est-anchor.pem").read_bytes() == device.est.ca_file.read_bytes()


def test_wrong_fingerprint_exit_65_and_nothing_stored(device: Device) -> None:
    device.basic()
    device.configure(trust_anchor="", bootstrap_fingerprint_sha256="00" * 32)
    device.state_dir.mkdir()
    before = snapshot(device.state_dir)
    result = device.run("enroll")
    assert result.code == 65
    assert "no certificate from /cacerts has the configured SHA-256 fingerprint" in result.err
    assert snapshot(device.state_dir) == before
    assert not any(r.authorization for r in device.est.records)


def test_exit_codes(device: Device, tmp_path: Path) -> None:
    # 78: a password file others can read
    device.configure(username="device", password_file=str(password_file(tmp_path, mode=0o644)))
    result = device.run("enroll")
    assert result.code == 78 and "lets group or others access it" in result.err
    # 77: refused (wrong password)
    device.est.options.auth = "basic"
    device.configure(password_file=str(password_file(tmp_path, password="wrong")))
    result = device.run("enroll")
    assert result.code == 77 and "rejected our Basic credentials" in result.err
    # 76: garbage in a 200
    device.configure(username="", password_file="")
    device.est.options.auth = "none"
    device.est.options.fault = "garbage"
    result = device.run("enroll")
    assert result.code == 76 and "neither base64 nor DER" in result.err
    # 69: nobody listening
    device.configure(url=f"https://localhost:{procs.free_port()}")
    result = device.run("enroll")
    assert result.code == 69 and "cannot connect" in result.err
    # 78: EST not configured at all
    device.configure(url="")
    result = device.run("enroll")
    assert result.code == 78 and "est.url: not set" in result.err
    assert result.err.count("\n") == 1  # one line


def test_public_key_of_issued_cert_is_the_tpm_key(device: Device) -> None:
    assert device.run("enroll").code == 0
    current = device.state_dir / "identity" / "current"
    keys = TpmKeyStore(tcti=device.tpm.tcti)
    cert = x509.load_pem_x509_certificate((current / "cert.pem").read_bytes())
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert cert.public_key().public_bytes(*spki) == keys.public_key(
        (current / "key.tss2.pem").read_bytes()
    ).public_bytes(*spki)


def test_demo_runs_end_to_end() -> None:
    """`make demo`: swtpm + the standalone EST server + the CLI, everything stopped after."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "renewed: generation 2" in proc.stdout
    assert "already enrolled (use --force): generation 2" in proc.stdout


HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_concurrent_runs_exit_80_while_another_process_holds_the_lock(device: Device) -> None:
    assert device.run("enroll").code == 0
    before = snapshot(device.state_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(device.state_dir / LOCK_FILE_NAME)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        contacted = len(device.est.records)
        busy = device.run("renew")
        assert busy.code == 80, busy.err
        assert busy.err.count("\n") == 1 and "another devid-agent process" in busy.err
        assert len(device.est.records) == contacted
        assert snapshot(device.state_dir) == before
    finally:
        holder.communicate("", timeout=10)  # closing stdin ends it, and its lock
    assert device.run("renew").code == 0


@pytest.mark.parametrize("retry_after", ["²", "9" * 5000])
def test_unparseable_retry_after_is_exit_75_not_a_traceback(
    device: Device, retry_after: str
) -> None:
    device.est.options.pending = 1
    device.est.options.retry_after = retry_after
    result = device.run("enroll")
    assert result.code == 75, result.err
    assert "Traceback" not in result.err
    assert result.err.splitlines()[-1].startswith("devid-agent: the EST server accepted")


# -- exit codes of their own (agent.errors.classify) -------------------------------------------


def test_renew_when_not_enrolled_is_exit_81_and_contacts_no_one(device: Device) -> None:
    result = device.run("renew")
    assert result.code == 81, result.err
    assert result.err.count("\n") == 1 and "run `devid-agent enroll` first" in result.err
    assert device.est.records == []


def test_renew_with_an_expired_identity_is_exit_82_and_enroll_recovers(device: Device) -> None:
    device.configure(clock_skew_seconds=0)
    device.est.options.cert_lifetime_seconds = 61  # back-dated 60 s: 1 s of validity
    assert device.run("enroll").code == 0
    cert = x509.load_pem_x509_certificate(
        (device.state_dir / "identity/current/cert.pem").read_bytes()
    )
    while datetime.now(timezone.utc) <= cert.not_valid_after_utc:  # waits for a fact, not a time
        time.sleep(0.05)
    device.est.records.clear()
    before = snapshot(device.state_dir)
    result = device.run("renew")
    assert result.code == 82, result.err
    assert "expired" in result.err and "devid-agent enroll" in result.err
    assert device.est.records == []  # it knew without asking
    assert snapshot(device.state_dir) == before
    device.est.options.cert_lifetime_seconds = 30 * 86400
    assert device.run("enroll").code == 0  # an expired identity is re-enrolled with bootstrap


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_server_rejecting_our_client_certificate_is_exit_83(device: Device, tls: str) -> None:
    assert device.run("enroll").code == 0
    device.est.options.reject_client_certs = True
    device.est.options.tls12_only = tls == "1.2"
    before = snapshot(device.state_dir)
    result = device.run("renew")
    assert result.code == 83, result.err
    assert "UNKNOWN_CA" in result.err and result.err.count("\n") == 1
    assert snapshot(device.state_dir) == before


def test_503_with_retry_after_is_exit_75(device: Device) -> None:
    device.est.options.fault = "5xx"
    device.est.options.retry_after_503 = "120"
    result = device.run("enroll")
    assert result.code == 75, result.err
    assert "HTTP 503" in result.err and "retry after 120 s" in result.err


def test_renew_while_an_enroll_request_is_pending_is_exit_77(device: Device) -> None:
    assert device.run("enroll").code == 0
    device.est.options.pending = 1
    assert device.run("enroll", "--force").code == 75
    pending = device.state_dir / "est-pending.json"
    retry_at = datetime.fromisoformat(json.loads(pending.read_text())["retry_at"])
    while datetime.now(timezone.utc) <= retry_at:  # waits for a fact, not a time
        time.sleep(0.05)
    contacted = len(device.est.records)
    result = device.run("renew")
    assert result.code == 77, result.err
    assert "/simpleenroll request is pending" in result.err and result.err.count("\n") == 1
    assert len(device.est.records) == contacted
    assert pending.exists()


def test_a_garbled_pending_file_is_exit_74_and_left_alone(device: Device) -> None:
    device.state_dir.mkdir(mode=0o700)
    pending = device.state_dir / "est-pending.json"
    pending.write_bytes(b"{not json")
    pending.chmod(0o600)
    result = device.run("enroll")
    assert result.code == 74, result.err
    assert str(pending) in result.err and result.err.count("\n") == 1
    assert pending.read_bytes() == b"{not json"
    assert device.est.records == []
