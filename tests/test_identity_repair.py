"""Self-repair of a damaged current identity, through the real CLI, swtpm and EST server.

A damaged current generation (an empty key file, a garbage certificate, a key that is not the
certificate's, `current` pointing at nothing) no longer makes `enroll` and `renew` fail forever:
the newest other generation that can serve becomes current again, or, when none can, the device
enrolls afresh with its bootstrap credential. The damaged generation stays for diagnosis.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.device import Device


def gen(device: Device, n: int) -> Path:
    return device.state_dir / "identity" / f"gen-{n}"


def current(device: Device) -> str:
    return os.readlink(device.state_dir / "identity" / "current")


def empty_key(d: Path) -> str:
    (d / "key.tss2.pem").write_bytes(b"")
    return f"{d / 'key.tss2.pem'} is empty"


def garbage_cert(d: Path) -> str:
    (d / "cert.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")
    return "not a PEM certificate"


def foreign_key(d: Path) -> str:
    shutil.copy(d.parent / "gen-1" / "key.tss2.pem", d / "key.tss2.pem")
    return f"does not hold the key of {d / 'cert.pem'}"


def dangling(d: Path) -> str:
    shutil.rmtree(d)
    return "no key file"


DAMAGE: dict[str, Callable[[Path], str]] = {
    "empty key file": empty_key,
    "garbage certificate": garbage_cert,
    "another generation's key": foreign_key,
    "current points at nothing": dangling,
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_current_generation_falls_back_to_the_previous_one(
    device: Device, damage: str
) -> None:
    assert device.run("enroll").code == 0
    assert device.run("renew").code == 0
    reason = DAMAGE[damage](gen(device, 2))
    repaired = device.run("enroll")
    assert repaired.code == 0, repaired.err
    assert "already enrolled" in repaired.out  # generation 1 is still valid
    line = next(x for x in repaired.out.splitlines() if x.startswith("repaired: "))
    assert line.startswith("repaired: identity generation 2 was damaged (")
    assert reason in line and line.endswith("; fell back to generation 1")
    assert current(device) == "gen-1"
    assert gen(device, 2).exists() == (damage != "current points at nothing")  # kept to inspect
    renewed = device.run("renew")
    assert renewed.code == 0, renewed.err
    new = 2 if damage == "current points at nothing" else 3  # a number on disk is never reused
    assert f"renewed: generation {new}" in renewed.out
    assert current(device) == f"gen-{new}"


def test_with_no_generation_left_the_device_enrolls_afresh(device: Device) -> None:
    assert device.run("enroll").code == 0
    empty_key(gen(device, 1))
    again = device.run("enroll")
    assert again.code == 0, again.err
    assert "enrolled: generation 2" in again.out
    assert (
        "repaired: identity generation 1 was damaged "
        f"({gen(device, 1) / 'key.tss2.pem'} is empty); no other generation can serve: "
        "enrolling afresh"
    ) in again.out
    assert current(device) == "gen-2"
    renew = device.run("renew")  # a damaged current no longer blocks renew either
    assert renew.code == 0, renew.err


def test_renew_repairs_before_it_authenticates(device: Device) -> None:
    assert device.run("enroll").code == 0
    assert device.run("renew").code == 0
    garbage_cert(gen(device, 2))
    renewed = device.run("renew")  # with generation 1's identity, still valid
    assert renewed.code == 0, renewed.err
    assert "renewed: generation 3" in renewed.out
    assert "fell back to generation 1" in renewed.out
