"""BootControl backends against the real tools: fw_printenv/fw_setenv on a redundant file
environment, grub-editenv on a GRUB block, and the development file backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import BootControlError
from hal.bootloader.file import FileBootControl
from hal.bootloader.grub import GrubBootControl
from hal.bootloader.uboot import UBootBootControl
from hal.interfaces import BootControl
from tests.support.firmware import Rig, read_uboot, uboot_env, write_grub


def uboot(tmp_path: Path) -> tuple[UBootBootControl, Rig]:
    rig = Rig(tmp_path / "dev", bootloader="uboot")
    return UBootBootControl(config=rig.fw_env_config), rig


def test_uboot_operations(tmp_path: Path) -> None:
    boot, rig = uboot(tmp_path)
    assert isinstance(boot, BootControl)
    state = boot.state()
    assert state.order == ("A", "B") and state.next_boot() == "A"
    boot.mark_bad("B")
    assert rig.env()["BOOT_ORDER"] == "A" and rig.env()["BOOT_B_LEFT"] == "0"
    boot.set_primary("B", tries=2)
    assert boot.state().order == ("B", "A") and boot.state().tries_left["B"] == 2
    boot.mark_good("A")
    assert boot.state().tries_left["A"] == 3 and boot.state().order == ("B", "A")


def test_uboot_missing_variables_take_rauc_defaults(tmp_path: Path) -> None:
    boot, rig = uboot(tmp_path)
    for env in rig.env_files:
        uboot_env(env, {"bootcmd": "run rauc_boot"})
    state = boot.state()
    assert state.order == ("A", "B") and state.tries_left == {"A": 3, "B": 3}
    boot.set_primary("B", tries=3)
    assert read_uboot(rig.fw_env_config)["bootcmd"] == "run rauc_boot"


def test_uboot_writes_alternate_redundant_copies(tmp_path: Path) -> None:
    boot, rig = uboot(tmp_path)
    before = [p.read_bytes() for p in rig.env_files]
    boot.set_primary("B", tries=3)
    after = [p.read_bytes() for p in rig.env_files]
    assert sum(a != b for a, b in zip(before, after, strict=True)) == 1  # one copy kept


def test_uboot_unknown_slot_and_bad_order(tmp_path: Path) -> None:
    boot, rig = uboot(tmp_path)
    with pytest.raises(BootControlError, match="unknown slot 'C'"):
        boot.set_primary("C", tries=1)
    from tests.support.firmware import write_uboot

    write_uboot(rig.fw_env_config, {"BOOT_ORDER": "A A"})
    with pytest.raises(BootControlError, match="BOOT_ORDER='A A' is not an order"):
        boot.state()


def test_uboot_tool_missing(tmp_path: Path) -> None:
    _boot, rig = uboot(tmp_path)
    boot = UBootBootControl(config=rig.fw_env_config, printenv="/nonexistent/fw_printenv")
    with pytest.raises(BootControlError, match="cannot run /nonexistent/fw_printenv"):
        boot.state()


def test_grub_operations(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "dev", bootloader="grub")
    boot = GrubBootControl(env_file=rig.grubenv)
    assert boot.state().tries_left == {"A": 1, "B": 0}
    boot.set_primary("B", tries=3)
    assert rig.env()["ORDER"] == "B A" and rig.env()["B_OK"] == "1"
    assert boot.state().next_boot() == "B"
    write_grub(rig.grubenv, {"B_TRY": "1"})  # GRUB tried B
    assert boot.state().next_boot() == "A"
    boot.mark_good("B")
    assert boot.state().next_boot() == "B"
    assert len(rig.grubenv.read_bytes()) == 1024
    assert [p.name for p in rig.root.iterdir() if p.name.startswith(".grubenv")] == []


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:1000],  # truncated
        lambda b: b"X" + b[1:],  # header
        lambda b: b"",  # empty
    ],
)
def test_grub_corrupt_block(tmp_path: Path, damage: object) -> None:
    rig = Rig(tmp_path / "dev", bootloader="grub")
    rig.grubenv.write_bytes(damage(rig.grubenv.read_bytes()))  # type: ignore[operator]
    before = rig.grubenv.read_bytes()
    boot = GrubBootControl(env_file=rig.grubenv)
    with pytest.raises(BootControlError, match=r"GRUB env .* is corrupt"):
        boot.set_primary("B", tries=1)
    assert rig.grubenv.read_bytes() == before


def test_grub_invalid_flag(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "dev", bootloader="grub")
    write_grub(rig.grubenv, {"A_OK": "2"})
    with pytest.raises(BootControlError, match="A_OK=2 is not 0 or 1"):
        GrubBootControl(env_file=rig.grubenv).state()


def test_file_backend(tmp_path: Path) -> None:
    path = tmp_path / "bootenv"
    boot = FileBootControl(path=path)
    assert boot.state().next_boot() == "A"
    boot.set_primary("B", tries=2)
    assert FileBootControl(path=path).state().tries_left["B"] == 2
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text(path.read_text().replace("BOOT_B_LEFT=2", "BOOT_B_LEFT=3"))
    with pytest.raises(BootControlError, match="CRC-32 mismatch"):
        boot.state()


def test_uboot_default_environment_is_not_taken_for_the_real_one(tmp_path: Path) -> None:
    """Found in review: with a default environment installed (/etc/u-boot-initial-env on Yocto
    and Buildroot images), libubootenv answers a corrupt env with its defaults and exit 0;
    that must be refused like any corrupt env, and nothing written."""
    boot, rig = uboot(tmp_path)
    defaults = tmp_path / "u-boot-initial-env"
    defaults.write_text("BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=3\n")
    tools = {}
    for tool in ("fw_printenv", "fw_setenv"):  # the real tools, as if /etc held the defaults
        tools[tool] = tmp_path / tool
        tools[tool].write_text(f'#!/bin/sh\nexec {tool} -f "{defaults}" "$@"\n')
        tools[tool].chmod(0o755)
    boot = UBootBootControl(
        config=rig.fw_env_config,
        printenv=str(tools["fw_printenv"]),
        setenv=str(tools["fw_setenv"]),
    )
    assert boot.state().order == ("A", "B")  # a valid env reads as before
    for env in rig.env_files:
        data = bytearray(env.read_bytes())
        data[10] ^= 0xFF
        env.write_bytes(bytes(data))
    before = [p.read_bytes() for p in rig.env_files]
    with pytest.raises(BootControlError, match=r"is corrupt: .*fell back to its defaults"):
        boot.state()
    with pytest.raises(BootControlError, match="is corrupt"):
        boot.mark_bad("B")
    assert [p.read_bytes() for p in rig.env_files] == before


def test_uboot_env_with_non_utf8_bytes(tmp_path: Path) -> None:
    """Found in review: a byte that is not UTF-8 anywhere in the env escaped from
    subprocess as a UnicodeDecodeError. Another variable's bytes are none of our business;
    in one of ours they are a corrupt value, named."""
    import subprocess

    boot, rig = uboot(tmp_path)
    script = b"splash=logo-\xe9t\xe9.bmp\n"
    subprocess.run(["fw_setenv", "-c", str(rig.fw_env_config), "-s", "-"], input=script, check=True)
    boot.set_primary("B", tries=2)
    assert boot.state().order == ("B", "A")
    script = b"BOOT_A_LEFT=\xff\n"
    subprocess.run(["fw_setenv", "-c", str(rig.fw_env_config), "-s", "-"], input=script, check=True)
    with pytest.raises(BootControlError, match="is corrupt: BOOT_A_LEFT="):
        boot.state()


def test_a_variable_twice_is_corrupt(tmp_path: Path) -> None:
    """Found in review: the last of two BOOT_ORDER lines silently won."""
    import zlib

    path = tmp_path / "bootenv"
    body = "BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_ORDER=B A\n"
    path.write_text(f"# devid-agent boot env crc32={zlib.crc32(body.encode()):08x}\n{body}")
    with pytest.raises(BootControlError, match="is corrupt: BOOT_ORDER appears twice"):
        FileBootControl(path=path).state()


def test_grub_write_never_follows_a_link_planted_at_its_temp_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The env is edited in a copy beside it (often in /boot, as root): the copy is created
    exclusively, so a symlink planted at its name is neither followed nor truncated."""
    import os

    import hal.storage

    rig = Rig(tmp_path / "dev", bootloader="grub")
    before = rig.grubenv.read_bytes()
    monkeypatch.setattr(hal.storage, "token", lambda: "fixed")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, rig.grubenv.with_name(f".{rig.grubenv.name}.tmp-{os.getpid()}-fixed"))
    with pytest.raises(BootControlError, match="File exists"):
        GrubBootControl(env_file=rig.grubenv).set_primary("B", tries=1)
    assert victim.read_bytes() == b"precious"
    assert rig.grubenv.read_bytes() == before
