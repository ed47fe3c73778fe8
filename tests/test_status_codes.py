"""Every `status` exit code, through the real CLI over real state: identities installed by the
identity store, the scheduler's state file as the renewal scheduler writes it, a broken boot env.
The codes are documented in the README and in `status --help`."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from agent.cli import (
    EXIT_HAL,
    EXIT_IDENTITY_EXPIRED,
    EXIT_IDENTITY_UNUSABLE,
    EXIT_NOT_ENROLLED,
    EXIT_RENEWAL_FAILING,
    EXIT_SERVICE_NOT_RUNNING,
    build_parser,
)
from agent.renewal import History
from agent.renewal_state import SchedulerState, SchedulerStateStore
from hal.secure_dir import DirStore
from tests.conftest import ROOT
from tests.support.ca import TestCA, utcnow
from tests.test_status import device, enroll_software_identity, status


def failing_renewals(state: Path, failures: int) -> None:
    store = SchedulerStateStore(store=DirStore(state))
    store.save(SchedulerState(history=History(failures=failures)), utcnow())


def late_in_life(state: Path, ca: TestCA) -> None:
    """An identity with 10% of its lifetime left."""
    now = utcnow()
    enroll_software_identity(
        state, ca, not_before=now - dt.timedelta(days=9), not_after=now + dt.timedelta(days=1)
    )


def test_healthy_is_0(tmp_path: Path, test_ca: TestCA) -> None:
    rig, state = device(tmp_path)
    enroll_software_identity(state, test_ca)
    failing_renewals(state, 2)  # failures early in the lifetime are not yet a condition
    assert status(rig.config)[0] == 0


def test_not_enrolled(tmp_path: Path) -> None:
    rig, _ = device(tmp_path)
    assert status(rig.config)[0] == EXIT_NOT_ENROLLED == 81


def test_expired(tmp_path: Path, test_ca: TestCA) -> None:
    rig, state = device(tmp_path)
    now = utcnow()
    enroll_software_identity(
        state, test_ca, not_before=now - dt.timedelta(days=3), not_after=now - dt.timedelta(days=1)
    )
    assert status(rig.config)[0] == EXIT_IDENTITY_EXPIRED == 82


def test_renewal_failing_with_little_lifetime_left(tmp_path: Path, test_ca: TestCA) -> None:
    rig, state = device(tmp_path)
    late_in_life(state, test_ca)
    assert status(rig.config)[0] == 0  # no failed attempt recorded: renewal is just due
    failing_renewals(state, 3)
    assert status(rig.config)[0] == EXIT_RENEWAL_FAILING == 85
    rig.config.write_text(rig.config.read_text() + "[status]\nrenewal_failing_share = 0.05\n")
    assert status(rig.config)[0] == 0  # 10% left is above the configured 5%


@pytest.mark.parametrize("how", ["unreadable", "not_yet_valid"])
def test_identity_unusable(tmp_path: Path, test_ca: TestCA, how: str) -> None:
    rig, state = device(tmp_path)
    if how == "unreadable":
        enroll_software_identity(state, test_ca)
        (state / "identity" / "current" / "key.pem").unlink()
    else:
        now = utcnow()
        enroll_software_identity(
            state, test_ca, not_before=now + dt.timedelta(days=2), not_after=now + dt.timedelta(9)
        )
    code, out, _ = status(rig.config)
    assert code == EXIT_IDENTITY_UNUSABLE == 86, out


def test_a_part_unreadable(tmp_path: Path, test_ca: TestCA) -> None:
    rig, state = device(tmp_path)
    enroll_software_identity(state, test_ca)
    rig.file_env.write_bytes(b"garbage\n")
    assert status(rig.config)[0] == EXIT_HAL == 74


def test_the_codes_are_documented_in_help_and_readme() -> None:
    sub = build_parser()._subparsers
    assert sub is not None
    choices = sub._group_actions[0].choices
    assert isinstance(choices, dict)
    text = choices["status"].format_help()
    readme = (ROOT / "README.md").read_text()
    for code in (0, 81, 86, 82, 85, 74):
        assert f" {code} " in " ".join(text.split())
    for code in (85, 86):
        assert f"\n| {code} | `status`" in readme


def test_service_not_running_when_it_is_expected(tmp_path: Path, test_ca: TestCA) -> None:
    rig, state = device(tmp_path)
    expected = rig.config.read_text().replace("[control]\nenabled = false\n", "")
    expected = expected.replace("[paths]\n", f'[paths]\nrun_dir = "{tmp_path / "run"}"\n')
    rig.config.write_text(expected)
    assert status(rig.config)[0] == EXIT_NOT_ENROLLED  # the identity's condition wins
    enroll_software_identity(state, test_ca)
    code, out = status(rig.config)[:2]
    assert code == EXIT_SERVICE_NOT_RUNNING == 87
    assert "service:   not running (no control socket at" in out
