"""The real RAUC client (Debian 12's rauc 1.8) beside a device rig: `rauc service` on a private
D-Bus session bus, with a system.conf for the rig's U-Boot or GRUB environment and slots.

RAUC finds `fw_printenv`/`fw_setenv` on PATH and calls them without `-c`, so PATH starts with
a directory of two-line wrappers that add the rig's fw_env.config. The booted slot is given with
`--override-boot-slot=` (RAUC reads it once at start: `boot()` restarts the service). Everything
is stopped by PID.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.support import procs
from tests.support.firmware import Rig

BOOTNAMES = {"rootfs.0": "A", "rootfs.1": "B"}


def available() -> str | None:
    """None if rauc and dbus-daemon are installed, else why not."""
    for tool in ("rauc", "dbus-daemon"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install rauc dbus)"
    return None


class Rauc:
    def __init__(self, rig: Rig, root: Path, *, boot_attempts: int | None = None) -> None:
        self.rig = rig
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.bin = root / "bin"
        self.bin.mkdir(exist_ok=True)
        if rig.bootloader == "uboot":
            for tool in ("fw_printenv", "fw_setenv"):
                wrapper = self.bin / tool
                wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/{tool} -c {rig.fw_env_config} "$@"\n')
                wrapper.chmod(0o755)
            backend = "bootloader=uboot\n"
        else:
            backend = f"bootloader=grub\ngrubenv={rig.grubenv}\n"
        if boot_attempts is not None:
            backend += f"boot-attempts={boot_attempts}\nboot-attempts-primary={boot_attempts}\n"
        self.conf = root / "system.conf"
        self.conf.write_text(
            f"[system]\ncompatible={rig.compatible}\n{backend}"
            f"statusfile={root / 'status.raucs'}\n\n"
            f"[keyring]\npath={rig.files['anchor']}\n\n"
            f"[slot.rootfs.0]\ndevice={rig.slot['A']}\ntype=raw\nbootname=A\n\n"
            f"[slot.rootfs.1]\ndevice={rig.slot['B']}\ntype=raw\nbootname=B\n"
        )
        self.bus: subprocess.Popen[bytes] | None = None
        self.service: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}

    # -- processes ----------------------------------------------------------------------------

    def start(self) -> Rauc:
        bus_dir = self.root / "bus"
        bus_dir.mkdir(exist_ok=True)
        self.bus = procs.start(
            ["dbus-daemon", "--session", "--nofork", "--print-address=1",
             f"--address=unix:dir={bus_dir}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert self.bus.stdout is not None
        address = self.bus.stdout.readline().decode().strip()
        if not address:
            raise RuntimeError("dbus-daemon printed no address")
        self.env = {
            "PATH": f"{self.bin}:/usr/sbin:/usr/bin:/sbin:/bin",
            "LC_ALL": "C",
            "DBUS_SESSION_BUS_ADDRESS": address,
            "DBUS_STARTER_BUS_TYPE": "session",
        }
        self.boot(self.rig.booted)
        return self

    def boot(self, slot: str) -> None:
        """(Re)start `rauc service` for a system booted from `slot`; wait until it answers."""
        self._stop_service()
        with (self.root / "service.log").open("ab") as log:
            self.service = procs.start(
                ["rauc", "--conf", str(self.conf), "service", f"--override-boot-slot={slot}"],
                env=self.env, stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            done = self._run("status", "--output-format=json")
            if done.returncode == 0 and json.loads(done.stdout).get("booted") == slot:
                return
            if self.service.poll() is not None or time.monotonic() > deadline:
                log = (self.root / "service.log").read_text(errors="replace")[-500:]
                raise RuntimeError(f"rauc service did not come up: {done.stderr!r} {log}")
            time.sleep(0.02)

    def _stop_service(self) -> None:
        if self.service is not None:
            procs.stop(self.service)
            self.service = None

    def stop(self) -> None:
        self._stop_service()
        if self.bus is not None:
            procs.stop(self.bus)
            if self.bus.stdout is not None:
                self.bus.stdout.close()
            self.bus = None

    # -- commands -----------------------------------------------------------------------------

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["rauc", "--conf", str(self.conf), *args],
            env=self.env, capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip

    def status(self) -> dict[str, Any]:
        done = self._run("status", "--output-format=json")
        assert done.returncode == 0, done.stderr
        data: dict[str, Any] = json.loads(done.stdout)
        return data

    def mark(self, action: str, which: str) -> None:
        done = self._run("status", action, which)
        assert done.returncode == 0, done.stderr

    def view(self) -> dict[str, Any]:
        """What RAUC says, in the agent's terms: next boot and each slot's bootable verdict."""
        data = self.status()
        slots = {}
        for entry in data["slots"]:
            for name, slot in entry.items():
                slots[BOOTNAMES[name]] = slot["boot_status"] == "good"
        primary = data.get("boot_primary")
        return {
            "booted": data["booted"],
            "next_boot": BOOTNAMES[primary] if primary else None,
            "bootable": slots,
        }
