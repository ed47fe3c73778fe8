"""`devid-agent status`: one model for the identity, a pending EST request and the firmware."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
from pathlib import Path

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.cli import main
from agent.est.pending import PendingRequest, PendingStore
from agent.identity import IdentityStore
from hal.disk import FileStorage, FlockLock
from hal.interfaces import KeyAlgorithm
from hal.softkeys import SoftwareKeyStore
from tests.support.ca import TestCA, utcnow
from tests.support.firmware import Rig


def device(tmp_path: Path) -> tuple[Rig, Path]:
    """A firmware rig (file boot env) whose config also names an agent state_dir."""
    rig = Rig(tmp_path / "device", bootloader="file")
    state = tmp_path / "state"
    rig.config.write_text(
        rig.config.read_text().replace("[tpm]", f'[paths]\nstate_dir = "{state}"\n[tpm]')
        + "[control]\nenabled = false\n"  # the disk alone; tests/test_control_socket.py: the service
    )
    return rig, state


def enroll_software_identity(state: Path, ca: TestCA, **validity: dt.datetime) -> None:
    keys = SoftwareKeyStore()
    blob = keys.generate(KeyAlgorithm.EC_P256)
    cert = ca.issue(
        keys.public_key(blob),  # type: ignore[arg-type]
        subject="gw-test",
        eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
        **validity,  # type: ignore[arg-type]
    )
    IdentityStore(storage=FileStorage(), lock=FlockLock(), state_dir=state).install(
        key_blob=blob, key_file_name=keys.key_file_name, certificate=cert, chain=[ca.cert],
        ca_certs=[ca.cert],
    )  # fmt: skip


def status(config: Path, *extra: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--config", str(config), "status", *extra])
    return code, out.getvalue(), err.getvalue()


def test_not_enrolled_is_reported_and_unhealthy(tmp_path: Path) -> None:
    rig, _ = device(tmp_path)
    code, out, err = status(rig.config, "--json")
    report = json.loads(out)
    assert (code, err) == (81, "")
    assert report["identity"]["state"] == "none"
    assert report["device_id"] == "gw-test"
    assert report["firmware"]["booted"] == "A"
    assert report["errors"] == []


def test_valid_identity_is_healthy(tmp_path: Path, test_ca: TestCA) -> None:
    rig, state = device(tmp_path)
    enroll_software_identity(state, test_ca)
    code, out, _ = status(rig.config, "--json")
    identity = json.loads(out)["identity"]
    assert code == 0
    assert identity["state"] == "valid"
    assert identity["generation"] == 1
    assert identity["subject"] == "CN=gw-test"
    assert identity["key_store"] == "software" and identity["hardware_backed"] is False
    assert 0.9 < identity["lifetime_left"] <= 1.0
    code, text, _ = status(rig.config)
    assert code == 0
    assert "identity:  valid, generation 1" in text
    assert "(software key, WEAKER)" in text
    assert "firmware:  booted A, next boot A, committed security version 0" in text


def test_expired_identity_is_unhealthy(tmp_path: Path, test_ca: TestCA) -> None:
    rig, state = device(tmp_path)
    enroll_software_identity(
        state,
        test_ca,
        not_before=utcnow() - dt.timedelta(days=2),
        not_after=utcnow() - dt.timedelta(days=1),
    )
    code, out, _ = status(rig.config, "--json")
    assert code == 82
    assert json.loads(out)["identity"]["state"] == "expired"


def test_pending_request_is_shown(tmp_path: Path) -> None:
    rig, state = device(tmp_path)
    retry_at = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    PendingStore(path=state / "est-pending.json").save(
        PendingRequest(
            operation="simpleenroll", key_store="software", key_blob=b"k", reused_key=False,
            csr_der=b"c", proof_of_possession=False, created=utcnow(), retry_at=retry_at,
            attempts=2,
        )
    )  # fmt: skip
    _, text, _ = status(rig.config)
    assert (
        "EST:       /simpleenroll pending, next attempt after 2030-01-02T03:04:05Z (attempt 2)"
        in text
    )


def test_a_broken_part_is_reported_not_fatal(tmp_path: Path, test_ca: TestCA) -> None:
    rig, state = device(tmp_path)
    enroll_software_identity(state, test_ca)
    rig.file_env.write_bytes(b"garbage\n")
    code, out, _ = status(rig.config, "--json")
    report = json.loads(out)
    assert code == 74
    assert report["identity"]["state"] == "valid"  # still shown
    assert report["firmware"] is None
    assert len(report["errors"]) == 1 and str(rig.file_env) in report["errors"][0]


def test_unreadable_identity_is_not_shown_as_a_software_key(tmp_path: Path) -> None:
    """An identity that cannot be read used to render as 'generation None ... software key,
    WEAKER': say it is unreadable, and give the error."""
    rig, state = device(tmp_path)
    (state / "identity").mkdir(parents=True)
    (state / "identity" / "current").symlink_to("gen-7")  # dangling: gen-7 does not exist
    code, text, _ = status(rig.config)
    assert json.loads(status(rig.config, "--json")[1])["identity"]["state"] == "unreadable"
    assert "identity:  unreadable (see the error below)" in text
    assert "WEAKER" not in text and "generation None" not in text
    assert text.splitlines()[-1].startswith("error:     ") and "gen-7" in text
    assert code == 86


def test_unreadable_identity_text() -> None:
    from agent.status import AgentStatus, IdentityStatus

    report = AgentStatus(
        device_id="gw", config="c.toml", identity=IdentityStatus(state="unreadable"),
        est_pending=None, firmware=None, errors=("cannot read x\nforged: line",),
    )  # fmt: skip
    assert report.to_text().splitlines()[1:] == [
        "identity:  unreadable (see the error below)",
        "error:     cannot read x\\nforged: line",
    ]
    assert not report.healthy


def test_config_option_after_the_subcommand(tmp_path: Path) -> None:
    rig, _ = device(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["status", "--json", "--config", str(rig.config)])
    assert code == 81 and json.loads(out.getvalue())["device_id"] == "gw-test"


def test_foreign_exception_is_one_line_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.cli.status_cmd

    rig, _ = device(tmp_path)

    def boom(config: object) -> None:
        raise ValueError("bad\nthing")

    monkeypatch.setattr(agent.cli.status_cmd, "collect", boom)
    code, out, err = status(rig.config)
    assert (code, out) == (1, "")
    assert (
        err == "devid-agent: unexpected error ValueError: bad\\nthing (run with -v for details)\n"
    )

    def disk(config: object) -> None:
        raise OSError(5, "Input/output error", "/var/lib/devid-agent/state.json")

    monkeypatch.setattr(agent.cli.status_cmd, "collect", disk)
    code, out, err = status(rig.config)
    assert (code, err) == (74, "devid-agent: Input/output error: /var/lib/devid-agent/state.json\n")


@pytest.mark.parametrize(
    ("args", "codes"),
    [
        (["status"], {141}),
        (["status", "--json"], {141}),
        (["doctor"], {141}),
        # argparse's own help output: some CPython 3.11 builds swallow the failed write (0),
        # others let it reach our handler (141); either way, no traceback
        (["--help"], {0, 141}),
        (["status", "--help"], {0, 141}),
    ],
)
def test_closed_stdout_is_no_traceback(tmp_path: Path, args: list[str], codes: set[int]) -> None:
    """`devid-agent status | head -0`: the reader is gone before we write."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    rig, _ = device(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "agent.cli", *args, "--config", str(rig.config)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=60,
            check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode in codes


def test_system_clock() -> None:
    from agent.clock import SystemClock

    clock = SystemClock()
    assert clock.now().utcoffset() == dt.timedelta(0)
    start = clock.monotonic()
    clock.sleep(-5.0)  # a deadline already past: no ValueError from time.sleep
    assert 0 <= clock.monotonic() - start < 1


def test_empty_config_option_is_a_config_error() -> None:
    """`--config ""` used to fall back silently to $DEVID_AGENT_CONFIG or /etc/devid-agent."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["status", "--config", ""])
    assert (code, err.getvalue()) == (
        78,
        "devid-agent: --config: expected a config file path, got ''\n",
    )
