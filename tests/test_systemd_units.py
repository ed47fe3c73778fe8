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
    assert [u.name for u in UNITS] == ["devid-agent-enroll.service"]


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
