"""The unit files pass `systemd-analyze verify` and stay well hardened (offline security score)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

UNITS = sorted((ROOT / "systemd").glob("*.service"))
AGENT = ROOT / ".venv" / "bin" / "devid-agent"


def installed_copy(unit: Path, tmp_path: Path) -> Path:
    """The unit as installed, but pointing at this checkout's devid-agent (verify checks it)."""
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/usr/bin/devid-agent", str(AGENT)))
    return copy


def test_there_are_units() -> None:
    assert [u.name for u in UNITS] == ["devid-agent-enroll.service", "devid-agent.service"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(installed_copy(unit, tmp_path))],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_is_hardened(unit: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(installed_copy(unit, tmp_path))],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match, result.stdout[-500:]
    assert float(match.group(1)) <= 2.0


def _setting(unit: Path, key: str) -> list[str]:
    values: list[str] = []
    for line in unit.read_text().splitlines():
        if line.startswith(f"{key}="):
            values += line.split("=", 1)[1].split()
    return values


def test_enroll_unit_never_retries_what_the_readme_says_not_to() -> None:
    """README's exit codes: 65 (trust check failed) "do not retry the same input", 77 and 78
    "need a human". A unit restarting on 65 retried a security failure every 5 minutes."""
    from agent.cli import (
        EXIT_BAD_RESPONSE,
        EXIT_CLIENT_REJECTED,
        EXIT_CONFIG,
        EXIT_REJECTED,
        EXIT_TRUST,
    )

    unit = ROOT / "systemd" / "devid-agent-enroll.service"
    prevented = {int(v) for v in _setting(unit, "RestartPreventExitStatus")}
    assert prevented == {
        EXIT_TRUST,
        EXIT_BAD_RESPONSE,
        EXIT_REJECTED,
        EXIT_CONFIG,
        EXIT_CLIENT_REJECTED,
    }
    assert _setting(unit, "Restart") == ["on-failure"]
    readme = (ROOT / "README.md").read_text()
    for code in (EXIT_TRUST, EXIT_REJECTED, EXIT_CONFIG, EXIT_CLIENT_REJECTED):
        row = next(line for line in readme.splitlines() if line.startswith(f"| {code} |"))
        assert "do not retry" in row or "needs a human" in row


def test_sysusers_makes_the_service_user_a_member_of_tss(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    conf = ROOT / "systemd" / "sysusers.d" / "devid-agent.conf"
    done = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(conf)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    assert re.search(r"^devid-agent:x:\d+:\d+:.*:/var/lib/devid-agent:/usr/sbin/nologin$", passwd,
                     re.M)  # fmt: skip
    assert re.search(r"^tss:x:\d+:devid-agent$", (tmp_path / "etc" / "group").read_text(), re.M)


def test_tmpfiles_keeps_roots_firmware_state_apart_from_the_service(tmp_path: Path) -> None:
    conf = ROOT / "systemd" / "tmpfiles.d" / "devid-agent.conf"
    text = conf.read_text()
    assert "d /var/lib/devid-agent 0700 devid-agent devid-agent -" in text
    assert "d /var/lib/devid-agent-firmware 0755 root root -" in text
    assert "d /var/lib/devid-agent-firmware/private 0700 root root -" in text
    (tmp_path / "var" / "lib").mkdir(parents=True)
    root_only = conf.read_text().replace("devid-agent devid-agent", "root root")
    (tmp_path / "t.conf").write_text(root_only)
    done = subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create",
                           str(tmp_path / "t.conf")], capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    fw = tmp_path / "var" / "lib" / "devid-agent-firmware"
    assert (fw.stat().st_mode & 0o777, (fw / "private").stat().st_mode & 0o777) == (0o755, 0o700)


def test_the_service_unit_is_a_notify_service_with_a_watchdog() -> None:
    unit = ROOT / "systemd" / "devid-agent.service"
    assert _setting(unit, "Type") == ["notify"]
    assert _setting(unit, "ExecStart") == ["/usr/bin/devid-agent", "run"]
    assert _setting(unit, "WatchdogSec") and _setting(unit, "Restart") == ["on-failure"]
    assert _setting(unit, "Conflicts") == ["devid-agent-enroll.service"]


def test_the_service_makes_the_control_sockets_directory() -> None:
    from agent.config import PathsConfig

    text = (ROOT / "systemd" / "devid-agent.service").read_text()
    name = re.search(r"^RuntimeDirectory=(\S+)$", text, flags=re.M)
    assert name is not None and Path("/run") / name.group(1) == PathsConfig().run_dir
    # readers must reach the socket; its own 0660 and the peer check decide who may use it
    assert re.search(r"^RuntimeDirectoryMode=0755$", text, flags=re.M)
    assert "AF_UNIX" in re.search(r"^RestrictAddressFamilies=(.*)$", text, flags=re.M).group(1)  # type: ignore[union-attr]
