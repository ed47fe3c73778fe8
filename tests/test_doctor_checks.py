"""Each doctor check's failing case, against real parts: our EST server over HTTPS (untrusted,
unreachable, its Date header), real identities enrolled from it (expired, a key that does not
match), a real swtpm with its object slots used up, a real U-Boot environment gone corrupt, and
the real certificate files (missing, expired). Times are moved by passing `now`, never by
patching the clock."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.cli import main
from agent.cli.doctor_cmd import Context, Finding, check_key_store, run_checks
from agent.config import load_config
from agent.wiring import enroller
from hal.interfaces import KeyAlgorithm
from hal.tpm import TpmKeyStore
from tests.conftest import ROOT, provider_path
from tests.support import firmware as fw
from tests.support.ca import key_pem, pem
from tests.support.enroll_env import write_config
from tests.support.est_server import EstOptions, EstServer
from tests.support.procs import free_port
from tests.support.swtpm import Swtpm


@pytest.fixture
def est(tmp_path: Path) -> Iterator[EstServer]:
    with EstServer(tmp_path / "est", EstOptions()) as server:
        yield server


def configure(tmp_path: Path, est: EstServer | None, extra: str = "", **keys: Any) -> Path:
    path = write_config(
        tmp_path / "config.toml", state_dir=tmp_path / "state", est=est, store="software", **keys
    )
    if extra:
        with open(path, "a") as f:
            f.write(extra)
    return path


def checks(config: Path, now: datetime | None = None) -> dict[str, Finding]:
    return {f.check: f for f in run_checks(load_config(config), now=now)}


def now() -> datetime:
    return datetime.now(timezone.utc)


def doctor(config: Path, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        code = main(["--config", str(config), "doctor", *args])
    return code, out.getvalue()


def test_a_healthy_software_device_is_ok_but_warnings_can_fail_it(
    tmp_path: Path, est: EstServer
) -> None:
    config = configure(tmp_path, est)
    enroller(load_config(config)).enroll()
    found = checks(config)
    assert found["est_reachable"].status == "ok" and "trusted by" in found["est_reachable"].detail
    assert found["identity"].status == "ok" and found["identity_key"].status == "ok"
    assert "within" in found["clock"].detail  # it compared with the server's Date
    statuses = {f.status for f in found.values()}
    assert statuses == {"ok", "warning"}  # software keys; no credentials
    assert doctor(config)[0] == 0
    assert doctor(config, "--warnings-as-errors")[0] == 1


def test_est_url_unset_is_an_error_unless_the_device_only_does_firmware(tmp_path: Path) -> None:
    config = configure(tmp_path, None)
    assert checks(config)["est_config"].status == "error"
    rig = fw.Rig(tmp_path / "fw")
    assert checks(rig.config)["est_config"].status == "warning"


def test_a_group_readable_password_file_is_an_error(tmp_path: Path, est: EstServer) -> None:
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    pw.chmod(0o644)
    found = checks(configure(tmp_path, est, username="device", password_file=str(pw)))
    assert found["est_credentials"].status == "error"
    assert "mode 0644" in found["est_credentials"].detail and "chmod 600" in (
        found["est_credentials"].detail
    )
    pw.chmod(0o400)
    config = configure(tmp_path, est, username="device", password_file=str(pw))
    assert checks(config)["est_credentials"].status == "ok"


def test_a_missing_idevid_file_is_an_error(tmp_path: Path, est: EstServer) -> None:
    config = configure(
        tmp_path, est, idevid_cert=str(tmp_path / "no.pem"), idevid_key=str(tmp_path / "no.key")
    )
    found = checks(config)["est_credentials"]
    assert found.status == "error" and "does not exist" in found.detail


def test_a_missing_trust_anchor_is_an_error(tmp_path: Path, est: EstServer) -> None:
    config = configure(tmp_path, est, trust_anchor=str(tmp_path / "gone.pem"))
    found = checks(config)
    assert found["est_trust_anchor"].status == "error"
    assert "does not exist" in found["est_trust_anchor"].detail
    assert found["est_reachable"].status == "error"


def test_trust_anchor_expiry_warns_then_fails(tmp_path: Path, est: EstServer) -> None:
    config = configure(tmp_path, est)
    end = est.root.cert.not_valid_after_utc
    soon = checks(config, now=end - timedelta(days=5))["est_trust_anchor"]
    assert soon.status == "warning" and "expires at" in soon.detail
    late = checks(config, now=end + timedelta(days=1))["est_trust_anchor"]
    assert late.status == "error" and "expired" in late.detail


def test_the_stored_ca_set_expiry_warns_then_fails(tmp_path: Path, est: EstServer) -> None:
    config = configure(tmp_path, est)
    assert checks(config)["est_trust_anchor"].status == "ok"  # no CA set stored yet
    key = ec.generate_private_key(ec.SECP256R1())
    soon = est.root.issue(key.public_key(), subject="short-lived EST CA", ca=True,
                          lifetime=timedelta(days=10))  # fmt: skip
    stored = tmp_path / "state" / "cacerts.pem"
    stored.parent.mkdir(mode=0o700)
    stored.write_bytes(pem(est.root.cert) + pem(soon))
    warned = checks(config)["est_trust_anchor"]
    assert warned.status == "warning" and "short-lived EST CA" in warned.detail
    assert "cacerts.pem (2)" in warned.detail and "expires at" in warned.detail
    failed = checks(config, now=now() + timedelta(days=11))["est_trust_anchor"]
    assert failed.status == "error" and "expired at" in failed.detail


def test_an_est_server_not_trusted_by_the_anchor_is_an_error(
    tmp_path: Path, est: EstServer
) -> None:
    rogue = est.rogue_ca.write_cert(tmp_path / "rogue.pem")
    found = checks(configure(tmp_path, est, trust_anchor=str(rogue)))["est_reachable"]
    assert found.status == "error" and "not trusted" in found.detail


def test_an_unreachable_est_server_is_an_error(tmp_path: Path, est: EstServer) -> None:
    config = configure(tmp_path, est, url=f"https://localhost:{free_port()}")
    found = checks(config)["est_reachable"]
    assert found.status == "error" and "unreachable" in found.detail


def test_a_clock_off_the_servers_date_or_before_the_build_is_an_error(
    tmp_path: Path, est: EstServer
) -> None:
    config = configure(tmp_path, est)
    off = checks(config, now=now() + timedelta(hours=2))["clock"]
    assert off.status == "error" and "off the EST server's Date" in off.detail
    early = checks(configure(tmp_path, None), now=datetime(2001, 1, 1, tzinfo=timezone.utc))
    assert early["clock"].status == "error" and "before this agent was built" in (
        early["clock"].detail
    )


def test_an_expired_or_nearly_spent_identity(tmp_path: Path, est: EstServer) -> None:
    config = configure(tmp_path, est)
    result = enroller(load_config(config)).enroll()
    end = result.identity.certificate.not_valid_after_utc
    assert checks(config, now=end + timedelta(days=1))["identity"].status == "error"
    late = checks(config, now=end - timedelta(hours=12))["identity"]
    assert late.status == "warning" and "overdue" in late.detail


def test_a_key_that_does_not_match_the_certificate_is_an_error(
    tmp_path: Path, est: EstServer
) -> None:
    config = configure(tmp_path, est)
    identity = enroller(load_config(config)).enroll().identity
    identity.key_file.write_bytes(key_pem(ec.generate_private_key(ec.SECP256R1())))
    found = checks(config)["identity_key"]
    assert found.status == "error" and "does not match" in found.detail


def test_a_tpm_with_no_free_object_slots_is_an_error(tmp_path: Path, swtpm: Swtpm) -> None:
    blob = TpmKeyStore(tcti=swtpm.tcti).generate(KeyAlgorithm.EC_P256)
    key = tmp_path / "leak.tss2.pem"
    key.write_bytes(blob)
    config = configure(tmp_path, None)
    config.write_text(
        config.read_text().replace('store = "software"', 'store = "tpm"')
        + f'[tpm]\ntcti = "{swtpm.tcti}"\nopenssl_provider = "{provider_path()}"\n'
    )
    from tests.test_tpm_budget import LEAKER

    leaker = subprocess.Popen(
        [sys.executable, "-c", LEAKER, swtpm.tcti, str(key), "2"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert leaker.stdout is not None and leaker.stdout.readline() == "loaded\n"
        found = check_key_store(Context(load_config(config)))  # not the provider: one per process
    finally:
        os.kill(leaker.pid, signal.SIGKILL)
        leaker.communicate()
    assert found.status == "error" and "no key can be loaded" in found.detail


def test_a_provider_that_cannot_load_is_an_error(tmp_path: Path, swtpm: Swtpm) -> None:
    config = configure(tmp_path, None)
    config.write_text(
        config.read_text().replace('store = "software"', 'store = "tpm"')
        + f'[tpm]\ntcti = "{swtpm.tcti}"\nopenssl_provider = "{tmp_path / "tpm2.so"}"\n'
    )
    result = subprocess.run(  # its own process: a provider loads once per process
        [sys.executable, "-m", "agent.cli", "--config", str(config), "doctor", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    found = {f["check"]: f for f in json.loads(result.stdout)}["tls_provider"]
    assert result.returncode == 1 and found["status"] == "error", found


def test_a_corrupt_bootloader_env_is_an_error(tmp_path: Path) -> None:
    rig = fw.Rig(tmp_path / "dev")
    assert checks(rig.config)["bootloader_env"].status == "ok"
    for env in rig.env_files:
        env.write_bytes(os.urandom(env.stat().st_size))
    found = checks(rig.config)["bootloader_env"]
    assert found.status == "error"


def test_firmware_anchors_missing_or_expired(tmp_path: Path) -> None:
    rig = fw.Rig(tmp_path / "dev")
    end = rig.vendor.root.cert.not_valid_after_utc
    expired = checks(rig.config, now=end + timedelta(days=1))["firmware_anchors"]
    assert expired.status == "error" and "expired" in expired.detail
    rig.files["anchor"].unlink()
    assert checks(rig.config)["firmware_anchors"].status == "error"


def _service_config(tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    path = tmp_path / "service.toml"
    path.write_text(f'[device]\nid = "gw-1"\n[paths]\nstate_dir = "{tmp_path / "state"}"\n'
                    f'run_dir = "{run}"\n')  # fmt: skip
    return path, run / "control.sock"


def test_service_not_running_is_a_warning_and_a_socket_that_does_not_answer_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from agent.cli import doctor_cmd
    from agent.cli.doctor_cmd import check_service

    path, sock_path = _service_config(tmp_path)
    found = check_service(Context(load_config(path)))
    assert found.status == "warning" and "not running (no control socket" in found.detail
    # a stale socket (nobody listens): still "not running"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    found = check_service(Context(load_config(path)))
    assert found.status == "warning" and "stale" in found.detail
    stale.close()
    sock_path.unlink()
    # a socket that accepts but never answers (a service stuck in a step): an error
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.bind(str(sock_path))
    stuck.listen(1)
    monkeypatch.setattr(doctor_cmd, "SERVICE_PROBE_SECONDS", 0.2)  # the wait, not the verdict
    try:
        found = check_service(Context(load_config(path)))
    finally:
        stuck.close()
    assert found.status == "error" and "does not answer" in found.detail, found
    # not expected: ok
    path.write_text(path.read_text() + "[control]\nenabled = false\n")
    assert check_service(Context(load_config(path))).status == "ok"
