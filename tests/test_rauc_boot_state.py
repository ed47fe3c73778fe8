"""RAUC-exact boot state without RAUC: the variable writes rauc 1.8 makes (observed with the real
client, and in its src/bootchooser.c), read the way RAUC and the bootloader read them.

- U-Boot: `BOOT_x_LEFT` is hex (RAUC writes `%x` in mark-good, "3"/"0" in mark-bad/mark-active,
  and in 1.8 boot-attempts-primary with `%d` in mark-active: "12" is then 0x12 = 18 to RAUC
  and U-Boot); mark-bad removes the slot from BOOT_ORDER and sets its LEFT to 0; mark-active
  puts it first and keeps the others, a recovery slot included, in place.
- GRUB: RAUC's grub.conf sets ORDER="A B" A_OK=0 B_OK=0 A_TRY=0 B_TRY=0 before load_env; a
  slot is good in `rauc status` when it is in ORDER with OK=1 and TRY=0.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.cli import EXIT_HAL
from agent.errors import BootControlError
from hal.bootloader.grub import GrubScheme
from hal.bootloader.uboot import UBootScheme
from tests.support.firmware import Rig, cli, image, make_bundle, write_grub, write_uboot

UBOOT = UBootScheme()
GRUB = GrubScheme(max_tries=1)


def test_uboot_left_is_hex() -> None:
    state = UBOOT.state({"BOOT_ORDER": "A B", "BOOT_A_LEFT": "c", "BOOT_B_LEFT": "12"}, "t")
    assert state.tries_left == {"A": 12, "B": 18}


def test_uboot_writes_hex() -> None:
    changes = UBOOT.set_primary({"BOOT_ORDER": "A B"}, "B", 12)
    assert changes == {"BOOT_ORDER": "B A", "BOOT_B_LEFT": "c"}
    assert UBootScheme(max_tries=10).mark_good({"BOOT_ORDER": "A B"}, "A")["BOOT_A_LEFT"] == "a"


@pytest.mark.parametrize("value", ["0x3", "zz", "-1", "", "12345"])
def test_uboot_left_that_is_no_hex_count_is_corrupt(value: str) -> None:
    with pytest.raises(BootControlError, match="is not a small hexadecimal number"):
        UBOOT.state({"BOOT_A_LEFT": value}, "t")


def test_recovery_slot_is_kept_in_place() -> None:
    env = {"BOOT_ORDER": "A B R", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"}
    state = UBOOT.state(env, "t")
    assert state.order == ("A", "B", "R") and state.next_boot() == "A"
    assert UBOOT.set_primary(env, "B", 3)["BOOT_ORDER"] == "B A R"
    assert UBOOT.mark_bad(env, "A")["BOOT_ORDER"] == "B R"
    assert GRUB.set_primary({"ORDER": "A B R"}, "B", 1)["ORDER"] == "B A R"


@pytest.mark.parametrize("order", ["A A", "A B;reset", "A\tB\x01"])
def test_order_that_is_no_order_of_names_is_corrupt(order: str) -> None:
    with pytest.raises(BootControlError, match="is not an order of slot names"):
        UBOOT.state({"BOOT_ORDER": order}, "t")


def test_rauc_mark_bad_writes_are_the_verdict() -> None:
    # rauc status mark-bad other (booted A): BOOT_ORDER=A, BOOT_B_LEFT=0
    state = UBOOT.state({"BOOT_ORDER": "A", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "0"}, "t")
    assert state.bootable("A") and not state.bootable("B")
    # rauc 1.8 mark-good of a slot out of BOOT_ORDER refills LEFT only: still bad to RAUC
    state = UBOOT.state({"BOOT_ORDER": "A", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"}, "t")
    assert not state.bootable("B")


def test_grub_defaults_are_raucs_grub_conf() -> None:
    state = GRUB.state({}, "t")
    assert state.order == ("A", "B") and state.next_boot() is None
    assert not state.bootable("A") and not state.bootable("B")
    state = GRUB.state({"ORDER": "B", "A_OK": "1", "B_OK": "1"}, "t")
    assert state.bootable("B") and not state.bootable("A")  # A is not in ORDER
    assert not GRUB.state({"A_OK": "1", "A_TRY": "1"}, "t").bootable("A")


def committed_on_both(rig: Rig) -> None:
    """B then A installed, booted and committed: both slots hold good records; A booted."""
    for version, slot in (("2.0", "B"), ("3.0", "A")):
        bundle = rig.write_bundle(make_bundle(image(8192), [rig.vendor.signer], version=version))
        assert cli(rig.config, "install", str(bundle))[0] == 0
        assert rig.reboot() == slot
        assert cli(rig.config, "commit")[0] == 0


@pytest.mark.parametrize("bootloader", ["uboot", "grub"])
def test_slot_rauc_marked_bad_is_bad_in_status_and_no_rollback_target(
    tmp_path: Path, bootloader: str
) -> None:
    # Found with the real RAUC: after `mark-bad other` the agent said "good" from its own
    # record, and `firmware rollback` made that slot the primary again.
    rig = Rig(tmp_path / "dev", bootloader=bootloader)
    committed_on_both(rig)
    if bootloader == "uboot":
        write_uboot(rig.fw_env_config, {"BOOT_ORDER": "A", "BOOT_B_LEFT": "0"})
    else:
        write_grub(rig.grubenv, {"B_OK": "0", "B_TRY": "0"})
    code, out, _ = cli(rig.config, "status")
    assert code == 0 and "slot B: bad" in out
    before = rig.snapshot()
    code, _, err = cli(rig.config, "rollback")
    assert code == EXIT_HAL and "slot B is marked bad in the bootloader" in err
    assert len(err.strip().splitlines()) == 1
    assert rig.snapshot() == before


def test_empty_grubenv_boots_nothing(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "dev", bootloader="grub")
    rig.grubenv.unlink()
    subprocess.run(["grub-editenv", str(rig.grubenv), "create"], check=True)
    code, out, err = cli(rig.config, "status")
    assert code == 0, err
    assert "next boot:          none" in out


@pytest.mark.parametrize("bootloader", ["uboot", "grub"])
def test_rollback_from_an_uncommitted_booted_install(tmp_path: Path, bootloader: str) -> None:
    # Mender's ArtifactRollback after the reboot into the new slot: back to the factory image,
    # which has no record of ours (it failed with "nothing to roll back to", exit 74).
    rig = Rig(tmp_path / "dev", bootloader=bootloader)
    bundle = rig.write_bundle(make_bundle(image(8192), [rig.vendor.signer], version="2.0"))
    assert cli(rig.config, "install", str(bundle))[0] == 0
    assert rig.reboot() == "B"
    code, out, err = cli(rig.config, "rollback")
    assert code == 0, err
    assert out.strip() == "slot A boots next"
    code, out, _ = cli(rig.config, "status")
    assert "slot B: failed" in out and "pending install:    none" in out
    assert rig.reboot() == "A"
