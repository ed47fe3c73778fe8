"""The SWUpdate hook's working directory is root's and fresh, never one another user made first."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

HOOK = ROOT / "contrib" / "swupdate" / "devid-install.sh"
OTHER_UID = 4242

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the hook runs as root")


def preinst(parent: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "DEVID_AGENT_FIRMWARE_DIR": str(parent)}
    return subprocess.run(
        ["sh", str(HOOK), "preinst"], env=env, capture_output=True, text=True, timeout=30,
        check=False,
    )  # fmt: skip


@needs_root
def test_preinst_makes_a_fresh_root_only_incoming_directory(tmp_path: Path) -> None:
    parent = tmp_path / "fw"
    assert preinst(parent).returncode == 0
    incoming = parent / "incoming"
    assert (parent.stat().st_mode & 0o777, parent.stat().st_uid) == (0o755, 0)
    assert (incoming.stat().st_mode & 0o777, incoming.stat().st_uid) == (0o700, 0)
    (incoming / "rootfs.fw").write_bytes(b"left over from an earlier run")
    assert preinst(parent).returncode == 0
    assert list(incoming.iterdir()) == []


@needs_root
@pytest.mark.parametrize("how", ["symlink", "foreign owner"])
def test_preinst_refuses_a_parent_another_user_made(tmp_path: Path, how: str) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, OTHER_UID, OTHER_UID)
    parent = tmp_path / "fw"
    if how == "symlink":
        parent.symlink_to(theirs)
    else:
        parent = theirs
    result = preinst(parent)
    assert result.returncode == 1
    assert result.stderr.strip() == f"refusing {parent}: not a root-owned directory"
    assert list(theirs.iterdir()) == []
