"""The audit trail: the pure chain (encode, verify: a removed, reordered, edited or torn line is
named), the writer over the real DirStore (O_APPEND, rotation that keeps the chain across
files, 0600), a failing write that leaves the operation standing, `audit verify`'s exit codes,
and the events of real operations: enroll and renew against our EST server, and root's firmware
install/commit/rollback/verify in root's firmware state directory."""

from __future__ import annotations

import io
import json
import logging
import stat
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agent import audit
from agent.audit_log import AuditLog
from agent.cli import EXIT_AUDIT_BROKEN, main
from agent.config import load_config
from agent.wiring import enroller, firmware_audit_log, service_audit_log
from hal.secure_dir import DirStore
from tests.conftest import ROOT
from tests.support import firmware as fw
from tests.support.enroll_env import write_config
from tests.support.est_server import EstOptions, EstServer

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


class StepClock:
    def __init__(self) -> None:
        self.t = T0

    def now(self) -> datetime:
        self.t += timedelta(seconds=1)
        return self.t

    def monotonic(self) -> float:
        return 0.0

    def sleep(self, seconds: float) -> None:
        pass

    def wait(self, event: Any, timeout: float) -> bool:
        return False


def chain(n: int) -> list[bytes]:
    lines, head = [], audit.EMPTY
    for i in range(n):
        line = audit.encode("renewal", {"n": i}, now=T0, seq=head.seq + 1, prev=head.hash)
        lines.append(line)
        head = audit.head_after(line)
    return lines


def verify(lines: list[bytes]) -> audit.ChainReport:
    return audit.verify_chain([("audit.jsonl", b"".join(lines))])


# -- pure ----------------------------------------------------------------------------------------


def test_a_record_is_one_canonical_line_carrying_the_hash_of_the_one_before() -> None:
    lines = chain(3)
    first = json.loads(lines[0])
    assert first["prev"] == audit.GENESIS and first["seq"] == 1
    assert first["time"] == "2026-01-02T03:04:05Z" and first["v"] == 1
    assert json.loads(lines[1])["prev"] == audit.line_hash(lines[0])
    assert all(line.count(b"\n") == 1 and line.endswith(b"\n") for line in lines)
    report = verify(lines)
    assert report.intact and report.lines == 3 and report.head.seq == 3


def test_a_newline_in_a_value_cannot_forge_a_line() -> None:
    line = audit.encode("x", {"error": 'a\n{"forged":1}'}, now=T0, seq=1, prev=audit.GENESIS)
    assert line.count(b"\n") == 1


@pytest.mark.parametrize("name", ["password", "est_password_file", "key_blob", "token", "seq"])
def test_secret_or_reserved_fields_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        audit.encode("x", {name: "v"}, now=T0, seq=1, prev=audit.GENESIS)


def test_non_scalar_values_are_refused_and_long_text_is_cut() -> None:
    with pytest.raises(ValueError, match="scalar"):
        audit.encode("x", {"blob": b"\x00"}, now=T0, seq=1, prev=audit.GENESIS)
    line = audit.encode("x", {"error": "e" * 5000}, now=T0, seq=1, prev=audit.GENESIS)
    assert len(json.loads(line)["error"]) == audit.MAX_TEXT


def test_an_edited_line_is_named_by_the_line_after_it() -> None:
    lines = chain(5)
    lines[2] = lines[2].replace(b'"n":2', b'"n":9')
    problem = verify(lines).problem
    assert problem is not None and problem.line == 4 and "edited" in problem.reason


def test_a_removed_line_is_detected() -> None:
    lines = chain(5)
    del lines[1]
    problem = verify(lines).problem
    assert problem is not None and problem.line == 2


def test_reordered_lines_are_detected() -> None:
    lines = chain(5)
    lines[1], lines[2] = lines[2], lines[1]
    problem = verify(lines).problem
    assert problem is not None and problem.line == 2


def test_a_removed_first_line_is_detected_only_as_a_start_past_a_rotation() -> None:
    """A trail may begin mid-chain (the oldest rotated file was dropped), so cutting the head
    is not a break; but a first record (seq 1) must carry the genesis hash."""
    lines = chain(3)
    assert verify(lines[1:]).intact
    forged = audit.encode("enroll", {}, now=T0, seq=1, prev="1" * 64)
    assert verify([forged]).problem is not None


def test_a_torn_or_garbage_line_is_named() -> None:
    lines = chain(3)
    torn = audit.verify_chain([("f", b"".join(lines)[:-7])])
    assert torn.problem is not None and torn.problem.line == 3 and "torn" in torn.problem.reason
    lines[1] = b"not json\n"
    problem = verify(lines).problem
    assert problem is not None and problem.line == 2 and "JSON" in problem.reason


# -- the writer over the real DirStore -------------------------------------------------------


def log_in(directory: Path, **kw: Any) -> AuditLog:
    return AuditLog(store=DirStore(directory), clock=StepClock(), **kw)


def test_records_append_with_mode_0600_and_verify(tmp_path: Path) -> None:
    trail = log_in(tmp_path / "state")
    for i in range(3):
        assert trail.record("renewal", {"outcome": "ok", "n": i})
    path = tmp_path / "state" / "audit.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [json.loads(x)["seq"] for x in path.read_bytes().splitlines()] == [1, 2, 3]
    assert trail.verify().intact


def test_rotation_keeps_the_chain_across_files_and_drops_the_oldest(tmp_path: Path) -> None:
    trail = log_in(tmp_path, max_bytes=1000, keep_files=2)
    for i in range(40):
        trail.record("renewal", {"outcome": "ok", "n": i, "pad": "x" * 60})
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("audit.jsonl"))
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all((tmp_path / n).stat().st_size <= 1000 for n in names)
    first_new = (tmp_path / "audit.jsonl").read_bytes().splitlines()[0]
    last_old = (tmp_path / "audit.jsonl.1").read_bytes().splitlines()[-1]
    assert json.loads(first_new)["prev"] == audit.line_hash(last_old)
    report = trail.verify()
    assert report.intact and report.head.seq == 40


def test_an_edit_in_a_rotated_file_names_that_file_and_line(tmp_path: Path) -> None:
    trail = log_in(tmp_path, max_bytes=1000, keep_files=2)
    for i in range(30):
        trail.record("renewal", {"outcome": "ok", "n": i, "pad": "x" * 60})
    old = tmp_path / "audit.jsonl.2"
    lines = old.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"ok"', b'"OK"')
    old.write_bytes(b"".join(lines))
    problem = trail.verify().problem
    assert problem is not None and problem.file == str(old) and problem.line == 3


def test_a_torn_tail_is_ended_and_chained_so_later_records_still_land(tmp_path: Path) -> None:
    trail = log_in(tmp_path)
    trail.record("enroll", {"outcome": "ok"})
    with open(tmp_path / "audit.jsonl", "ab") as f:
        f.write(b'{"torn')
    assert trail.record("renewal", {"outcome": "ok"})
    lines = (tmp_path / "audit.jsonl").read_bytes().splitlines()
    assert lines[1] == b'{"torn' and json.loads(lines[2])["prev"] == audit.line_hash(lines[1])
    problem = trail.verify().problem  # a torn line is still reported: it is not a record
    assert problem is not None and problem.line == 2


def test_a_symlink_in_place_of_the_trail_is_refused_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / "audit.jsonl").symlink_to(target)
    assert not log_in(tmp_path / "state").record("enroll", {"outcome": "ok"})
    assert target.read_bytes() == b""


def test_a_failing_write_is_logged_once_and_does_not_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    trail = log_in(blocker / "state")  # a directory that cannot be made
    with caplog.at_level(logging.WARNING, logger="agent.audit_log"):
        assert not trail.record("enroll", {"outcome": "ok"})
        assert not trail.record("renewal", {"outcome": "ok"})
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "the operation stands" in warnings[0].getMessage()


# -- `audit verify` ----------------------------------------------------------------------------


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_audit_verify_exit_0_then_84_naming_the_first_bad_line(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[device]\nid = "gw"\n[paths]\nstate_dir = "{tmp_path / "state"}"\n')
    trail = service_audit_log(load_config(config), clock=StepClock())
    for i in range(4):
        trail.record("renewal", {"outcome": "ok", "n": i})
    code, out, _ = cli("--config", str(config), "audit", "verify")
    assert code == 0 and out.startswith("OK: 4 records") and "head seq 4" in out
    path = tmp_path / "state" / "audit.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    del lines[1]
    path.write_bytes(b"".join(lines))
    code, out, err = cli("--config", str(config), "audit", "verify")
    assert code == EXIT_AUDIT_BROKEN == 84 and out == ""
    assert err.count("\n") == 1 and f"{path}: line 2:" in err


# -- events of real operations -------------------------------------------------------------------


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def test_enroll_renew_and_a_refused_renewal_are_recorded_without_secrets(tmp_path: Path) -> None:
    with EstServer(tmp_path / "est", EstOptions(auth="basic")) as est:
        pw = tmp_path / "pw"
        pw.write_text("enroll-secret\n")
        pw.chmod(0o600)
        config_path = write_config(
            tmp_path / "config.toml",
            state_dir=tmp_path / "state",
            est=est,
            store="software",
            username="device",
            password_file=str(pw),
        )
        config = load_config(config_path)
        enroller(config).enroll()
        enroller(config).renew()
        est.options.fault = "5xx"
        with pytest.raises(Exception):  # noqa: B017 - any refusal: what matters is the record
            enroller(config).renew()
    trail = tmp_path / "state" / "audit.jsonl"
    got = records(trail)
    assert [(r["event"], r["outcome"]) for r in got] == [
        ("enroll", "ok"),
        ("renewal", "ok"),
        ("renewal", "failed"),
    ]
    assert got[0]["key_store"] == "software" and got[0]["generation"] == 1
    assert got[1]["generation"] == 2 and got[1]["serial"]
    assert got[2]["disposition"] == "retry_later" and got[2]["error"]
    assert b"enroll-secret" not in trail.read_bytes()
    assert b"PRIVATE KEY" not in trail.read_bytes()
    assert service_audit_log(config).verify().intact


def test_firmware_events_go_to_roots_firmware_state_dir(tmp_path: Path) -> None:
    rig = fw.Rig(tmp_path / "dev")
    payload = fw.image()
    good = rig.write_bundle(
        fw.make_bundle(payload, [rig.vendor.signer], version="2.0", security_version=2)
    )
    bad = rig.write_bundle(fw.image(), name="garbage.fw")
    assert fw.cli(rig.config, "verify", str(good))[0] == 0
    assert fw.cli(rig.config, "verify", str(bad))[0] == 65
    assert fw.cli(rig.config, "install", str(good))[0] == 0
    rig.reboot()
    assert fw.cli(rig.config, "commit")[0] == 0
    assert fw.cli(rig.config, "rollback")[0] == 74  # nothing to roll back to
    got = records(rig.state_dir / "audit.jsonl")
    assert [(r["event"], r["outcome"]) for r in got] == [
        ("bundle_verified", "ok"),
        ("bundle_refused", "failed"),
        ("install", "ok"),
        ("commit", "ok"),
        ("rollback", "failed"),
    ]
    assert got[0]["version"] == "2.0" and got[0]["payload_digest"].startswith("sha256:")
    assert got[1]["security"] is True and got[1]["disposition"] == "security_event"
    assert got[2]["slot"] == "B" and got[3]["security_version"] == 2
    assert got[4]["disposition"] == "local_fault"
    config = load_config(rig.config)
    assert firmware_audit_log(config).verify().intact
    assert not (config.paths.state_dir / "audit.jsonl").exists()
    code, out, _ = cli("--config", str(rig.config), "audit", "verify", "--firmware")
    assert code == 0 and "5 records" in out


def test_audit_verify_in_a_fresh_process_against_a_tampered_trail(tmp_path: Path) -> None:
    state = tmp_path / "state"
    trail = log_in(state)
    for i in range(3):
        trail.record("enroll", {"outcome": "ok", "n": i})
    path = state / "audit.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"n":0', b'"n":7'))
    config = tmp_path / "c.toml"
    config.write_text(f'[device]\nid = "gw"\n[paths]\nstate_dir = "{state}"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(config), "audit", "verify"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 84
    assert proc.stderr == f"devid-agent: audit trail broken: {path}: line 2: " + (
        "prev is not the SHA-256 of the line before it (that line was edited, or lines were "
        "removed, inserted or reordered here)\n"
    )


WRITER = """
import sys
from pathlib import Path
from agent.audit_log import AuditLog
from agent.clock import SystemClock
from hal.secure_dir import DirStore
log = AuditLog(store=DirStore(Path(sys.argv[1])), clock=SystemClock(), max_bytes=16384)
for i in range(int(sys.argv[2])):
    assert log.record("renewal", {"outcome": "ok", "writer": sys.argv[3], "n": i})
"""


def test_concurrent_writers_keep_one_chain(tmp_path: Path) -> None:
    """The daemon, `enroll` and `renew` may write at once: the lock keeps one chain."""
    state = tmp_path / "state"
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(state), "20", str(w)], cwd=ROOT)
        for w in range(4)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    report = AuditLog(store=DirStore(state), clock=StepClock(), max_bytes=16384).verify()
    assert report.intact and report.lines == 80 and report.head.seq == 80
