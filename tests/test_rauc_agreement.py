"""The agent and the real RAUC (Debian 12's rauc 1.8) read the same U-Boot and GRUB environments
the same way (issue 9, Deliver 3).

After every agent operation `rauc status --output-format=json` agrees with `devid-agent firmware
status --json` (booted slot, next boot, each slot good/bad), and after every `rauc status
mark-good / mark-bad / mark-active` the agent agrees with RAUC; a slot RAUC marked bad is never
"good" in our status and never a rollback target. RAUC runs as `rauc service` on a private D-Bus
session bus (tests/support/rauc.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli import EXIT_HAL
from tests.support.firmware import Rig, cli, image, make_bundle, write_grub, write_uboot
from tests.support.rauc import Rauc, available

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

PAYLOAD = image(16 * 1024, seed=8)


def agent_view(rig: Rig) -> dict[str, Any]:
    code, out, err = cli(rig.config, "status", "--json")
    assert code == 0, err
    status = json.loads(out)
    for slot in status["slots"]:
        if not slot["bootable"]:  # the bootloader's verdict wins over our record
            assert slot["state"] in ("bad", "writing", "failed"), slot
    return {
        "booted": status["booted"],
        "next_boot": status["next_boot"],
        "bootable": {slot["name"]: slot["bootable"] for slot in status["slots"]},
    }


def agree(rig: Rig, rauc: Rauc) -> dict[str, Any]:
    view = agent_view(rig)
    assert view == rauc.view(), rig.env()
    return view


def agent(rig: Rig, *args: str) -> None:
    code, _out, err = cli(rig.config, *args)
    assert code == 0, err


def install(rig: Rig, version: str) -> None:
    path = rig.write_bundle(make_bundle(PAYLOAD, [rig.vendor.signer], version=version))
    agent(rig, "install", str(path))


def reboot(rig: Rig, rauc: Rauc) -> str:
    slot = rig.reboot()
    assert slot is not None
    rauc.boot(slot)
    return slot


@pytest.fixture(params=["uboot", "grub"])
def device(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Rig, Rauc]]:
    rig = Rig(tmp_path / "dev", bootloader=request.param)
    rauc = Rauc(rig, tmp_path / "rauc").start()
    try:
        yield rig, rauc
    finally:
        rauc.stop()


def test_agent_and_rauc_agree_through_a_whole_cycle(device: tuple[Rig, Rauc]) -> None:
    rig, rauc = device
    agree(rig, rauc)

    install(rig, "2.0")
    assert agree(rig, rauc)["next_boot"] == "B"
    assert reboot(rig, rauc) == "B"
    agree(rig, rauc)
    agent(rig, "commit")
    assert agree(rig, rauc)["bootable"] == {"A": True, "B": True}

    # RAUC marks the other slot bad: we say so too, and never roll back into it.
    rauc.mark("mark-bad", "other")
    assert agree(rig, rauc)["bootable"]["A"] is False
    before = rig.snapshot()
    code, _, err = cli(rig.config, "rollback")
    assert code == EXIT_HAL and len(err.strip().splitlines()) == 1
    assert "not rolling back" in err or "nothing to roll back to" in err
    assert rig.snapshot() == before

    for action, which in [
        ("mark-active", "other"),
        ("mark-good", "booted"),
        ("mark-active", "booted"),
        ("mark-good", "other"),
    ]:
        rauc.mark(action, which)
        agree(rig, rauc)

    # A second install makes A a committed slot; then rollback is allowed, and RAUC agrees.
    install(rig, "3.0")
    agree(rig, rauc)
    assert reboot(rig, rauc) == "A"
    agent(rig, "commit")
    agree(rig, rauc)
    agent(rig, "rollback")
    assert agree(rig, rauc)["next_boot"] == "B"
    rauc.mark("mark-bad", "other")
    agree(rig, rauc)
    code, _, err = cli(rig.config, "rollback")
    assert code == EXIT_HAL and "marked bad in the bootloader" in err
    rauc.mark("mark-good", "other")  # U-Boot: tries back, still out of BOOT_ORDER: still bad
    agree(rig, rauc)

    # RAUC marks the booted slot bad; the next good boot's commit makes it good again.
    rauc.mark("mark-bad", "booted")
    assert agree(rig, rauc)["bootable"]["A"] is False
    agent(rig, "commit")
    assert agree(rig, rauc)["bootable"]["A"] is True


def test_fallback_after_rauc_marks_the_new_slot_bad(device: tuple[Rig, Rauc]) -> None:
    rig, rauc = device
    install(rig, "2.0")
    rauc.mark("mark-bad", "other")  # e.g. a health check on the old system vetoed B
    agree(rig, rauc)
    code, out, err = cli(rig.config, "status", "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["fell_back"] is True
    assert {s["name"]: s["state"] for s in status["slots"]}["B"] == "bad"
    agent(rig, "commit")  # the pending install is a fallback now: recorded failed
    view = agree(rig, rauc)
    assert view["bootable"]["B"] is False


def test_hex_tries_and_rauc_18_decimal_mark_active(tmp_path: Path) -> None:
    # RAUC 1.8 writes boot-attempts-primary with %d in mark-active and %x in mark-good; it and
    # U-Boot read both as hex. So do we: "12" is 18 tries, "c" is 12.
    rig = Rig(tmp_path / "dev", bootloader="uboot")
    text = rig.config.read_text().replace("[firmware]\n", "[firmware]\nboot_tries = 12\n")
    rig.config.write_text(text)
    rauc = Rauc(rig, tmp_path / "rauc", boot_attempts=12).start()
    try:
        install(rig, "2.0")
        assert rig.env()["BOOT_B_LEFT"] == "c"  # written in hex, as RAUC writes
        agree(rig, rauc)
        rauc.mark("mark-active", "booted")
        assert rig.env()["BOOT_A_LEFT"] == "12"
        agree(rig, rauc)
        _code, out, _ = cli(rig.config, "status", "--json")
        tries = {s["name"]: s["tries_left"] for s in json.loads(out)["slots"]}
        assert tries == {"A": 0x12, "B": 0xC}
        rauc.mark("mark-good", "booted")
        assert rig.env()["BOOT_A_LEFT"] == "c"
        agree(rig, rauc)
    finally:
        rauc.stop()


def test_recovery_slot_in_boot_order_is_kept(device: tuple[Rig, Rauc]) -> None:
    rig, rauc = device
    if rig.bootloader == "uboot":
        write_uboot(rig.fw_env_config, {"BOOT_ORDER": "A B R"})
        key = "BOOT_ORDER"
    else:
        write_grub(rig.grubenv, {"ORDER": "A B R"})
        key = "ORDER"
    agree(rig, rauc)
    install(rig, "2.0")
    assert rig.env()[key] == "B A R"
    agree(rig, rauc)
    assert reboot(rig, rauc) == "B"
    agent(rig, "commit")
    assert rig.env()[key] == "B A R"
    agree(rig, rauc)
    rauc.mark("mark-bad", "other")
    agree(rig, rauc)
