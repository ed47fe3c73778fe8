"""Whole A/B cycles on real U-Boot and GRUB environments: install, reboot (RAUC's boot logic
applied to the env), commit, anti-rollback; and a new slot that never commits falls back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import EXIT_HAL, EXIT_TRUST
from tests.support.firmware import Rig, cli, image, make_bundle
from tests.support.swtpm import Swtpm

BOOTLOADERS = ["uboot", "grub", "file"]


def status(rig: Rig) -> dict:  # type: ignore[type-arg]
    code, out, err = cli(rig.config, "status", "--json")
    assert code == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def bundle(rig: Rig, version: str, security_version: int, seed: int) -> Path:
    data = make_bundle(
        image(40 * 1024, seed=seed),
        [rig.vendor.signer],
        version=version,
        security_version=security_version,
    )
    return rig.write_bundle(data, f"fw-{version}.fw")


@pytest.mark.parametrize("bootloader", BOOTLOADERS)
def test_install_reboot_commit_then_older_is_refused(tmp_path: Path, bootloader: str) -> None:
    rig = Rig(tmp_path / "dev", bootloader=bootloader)
    assert cli(rig.config, "commit")[0] == 0  # the factory image marks itself good
    v1, v2 = bundle(rig, "1.0", 1, 1), bundle(rig, "2.0", 2, 2)

    assert cli(rig.config, "install", str(v2))[0] == 0
    s = status(rig)
    assert s["pending"] == "B" and s["next_boot"] == "B" and s["committed_security_version"] == 0
    assert rig.reboot() == "B"
    code, out, err = cli(rig.config, "commit")
    assert code == 0, err
    assert "committed slot B; security version 2" in out
    s = status(rig)
    assert s["booted"] == "B" and s["pending"] is None and not s["fell_back"]
    assert s["committed_security_version"] == 2
    slot_b = next(x for x in s["slots"] if x["name"] == "B")
    assert slot_b["state"] == "good" and slot_b["version"] == "2.0" and slot_b["tries_left"] >= 1

    before = rig.snapshot()
    code, _out, err = cli(rig.config, "install", str(v1))
    assert code == EXIT_TRUST and "below the committed security version 2" in err
    assert rig.snapshot() == before
    # the booted slot keeps booting
    assert rig.reboot() == "B"


@pytest.mark.parametrize("bootloader", BOOTLOADERS)
def test_tries_run_out_and_the_bootloader_falls_back(tmp_path: Path, bootloader: str) -> None:
    rig = Rig(tmp_path / "dev", bootloader=bootloader)
    assert cli(rig.config, "commit")[0] == 0
    slot_a = rig.slot["A"].read_bytes()
    assert cli(rig.config, "install", str(bundle(rig, "2.0", 2, 2)))[0] == 0
    tries = 1 if bootloader == "grub" else 3
    for _ in range(tries):  # the new image boots, but never commits (it hangs, say)
        assert rig.reboot() == "B"
    assert rig.reboot() == "A"  # the bootloader gives up on B
    s = status(rig)
    assert s["booted"] == "A" and s["fell_back"] is True and s["pending"] == "B"
    assert s["committed_security_version"] == 0
    code, text, _err = cli(rig.config, "status")
    assert "last boot fell back: yes" in text
    code, out, _err = cli(rig.config, "commit")
    assert code == 0 and "fallen back from slot B" in out
    s = status(rig)
    assert s["fell_back"] is True and s["pending"] is None
    assert {x["name"]: x["state"] for x in s["slots"]} == {"A": "good", "B": "failed"}
    assert s["committed_security_version"] == 0
    assert rig.slot["A"].read_bytes() == slot_a
    # and the next install works
    assert cli(rig.config, "install", str(bundle(rig, "2.1", 2, 3)))[0] == 0
    assert rig.reboot() == "B"
    assert cli(rig.config, "commit")[0] == 0
    assert status(rig)["fell_back"] is False


@pytest.mark.parametrize("bootloader", ["uboot", "grub"])
def test_rollback_to_the_other_good_slot(tmp_path: Path, bootloader: str) -> None:
    rig = Rig(tmp_path / "dev", bootloader=bootloader)
    code, _out, err = cli(rig.config, "rollback")
    assert code == EXIT_HAL and "slot B holds no committed image" in err
    assert cli(rig.config, "commit")[0] == 0
    assert cli(rig.config, "install", str(bundle(rig, "1.1", 0, 2)))[0] == 0
    assert rig.reboot() == "B"
    assert cli(rig.config, "commit")[0] == 0
    code, out, err = cli(rig.config, "rollback")
    assert code == 0, err
    assert "slot A boots next" in out
    assert rig.reboot() == "A"


def test_rollback_below_the_committed_version_is_refused(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "dev")
    assert cli(rig.config, "commit")[0] == 0
    assert cli(rig.config, "install", str(bundle(rig, "2.0", 3, 2)))[0] == 0
    assert rig.reboot() == "B"
    assert cli(rig.config, "commit")[0] == 0
    before = rig.snapshot()
    code, _out, err = cli(rig.config, "rollback")
    assert code == EXIT_TRUST and "security_version 0, below the committed 3" in err
    assert rig.snapshot() == before


def test_commit_before_reboot_leaves_the_install_pending(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "dev")
    assert cli(rig.config, "install", str(bundle(rig, "2.0", 2, 2)))[0] == 0
    assert cli(rig.config, "commit")[0] == 0  # e.g. the mark-good service on this boot
    s = status(rig)
    assert s["pending"] == "B" and s["next_boot"] == "B" and s["committed_security_version"] == 0
    assert rig.reboot() == "B"
    assert cli(rig.config, "commit")[0] == 0
    assert status(rig)["committed_security_version"] == 2


def test_counter_is_not_raised_by_install(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "dev")
    assert cli(rig.config, "install", str(bundle(rig, "9.0", 9, 2)))[0] == 0
    assert status(rig)["committed_security_version"] == 0
    # a fallback leaves the older, still-allowed image installable
    assert cli(rig.config, "verify", str(bundle(rig, "1.0", 1, 1)))[0] == 0


def test_rollback_cancels_a_pending_install(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "dev")
    assert cli(rig.config, "commit")[0] == 0
    assert cli(rig.config, "install", str(bundle(rig, "2.0", 2, 2)))[0] == 0
    code, out, err = cli(rig.config, "rollback")
    assert code == 0, err
    assert "slot A boots next" in out
    s = status(rig)
    assert s["pending"] is None and s["next_boot"] == "A"
    assert {x["name"]: x["state"] for x in s["slots"]} == {"A": "good", "B": "failed"}
    assert rig.reboot() == "A"


def test_demo_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support import demo_firmware

    demo_firmware.run(tmp_path)
    out = capsys.readouterr().out
    assert "committed slot B; security version 2" in out
    assert "below the committed security version 2" in out
    assert "(file counter, NOT hardware-backed)" in out


def test_demo_uses_the_tpm_counter_when_given_a_tpm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], swtpm: Swtpm
) -> None:
    from tests.support import demo_firmware

    demo_firmware.run(tmp_path, tcti=swtpm.tcti)
    out = capsys.readouterr().out
    assert "committed slot B; security version 2" in out
    assert "below the committed security version 2" in out
    assert "security version: 2 (tpm counter)" in out


def test_firmware_commands_take_turns(tmp_path: Path) -> None:
    """An OTA hook and the mark-good service never interleave: a command waits for the lock."""
    import subprocess
    import sys

    from hal.lock import exclusive_lock

    rig = Rig(tmp_path / "dev", bootloader="file")
    rig.state_dir.mkdir(mode=0o700)
    root = Path(__file__).resolve().parent.parent
    with exclusive_lock(rig.state_dir / "lock"):
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "--config", str(rig.config), "firmware", "commit"],
            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(1.5)  # importing and reaching the lock takes well under that
        assert not (rig.state_dir / "state.json").exists()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert b"committed slot A" in out
