"""U-Boot environment through libubootenv's fw_printenv/fw_setenv, with RAUC's variables.

`BOOT_ORDER` ("A B": try A first; other names, such as a recovery slot in "A B R", are kept in
place), `BOOT_A_LEFT`/`BOOT_B_LEFT` (boots left before the slot is skipped, in hexadecimal as
RAUC writes and reads them: 10 tries is "a"). RAUC's boot script decrements `BOOT_x_LEFT` on
every boot of a slot and takes the first slot of `BOOT_ORDER` with tries left; marking good
refills the tries. All changes of one
operation go to fw_setenv in one script, which libubootenv writes as one new copy of a
redundant environment (the older copy survives a power cut). A missing variable takes the
default RAUC's script sets ("A B", max tries). libubootenv checks the CRC: when no copy is
valid, fw_printenv fails, or (with a default environment file installed) warns and prints the
defaults; either way we refuse to touch anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from hal.bootloader.base import (
    DEFAULT_SLOTS,
    Env,
    EnvBootControl,
    Scheme,
    corrupt,
    parse_lines,
    run_tool,
)
from hal.interfaces import BootState

_USING_DEFAULT = "using default"


class UBootScheme(Scheme):
    def state(self, env: Env, where: str) -> BootState:
        order = self.order(env, "BOOT_ORDER", where)
        left = {
            s: self.hex_number(env, f"BOOT_{s}_LEFT", self.max_tries, where) for s in self.slots
        }
        return BootState(order=order, tries_left=left)

    def set_primary(self, env: Env, slot: str, tries: int) -> dict[str, str]:
        order = [s for s in self.order(env, "BOOT_ORDER", "") if s != slot]
        return {"BOOT_ORDER": " ".join([slot, *order]), f"BOOT_{slot}_LEFT": format(tries, "x")}

    def mark_good(self, env: Env, slot: str) -> dict[str, str]:
        order = list(self.order(env, "BOOT_ORDER", ""))
        if slot not in order:
            order.append(slot)
        return {"BOOT_ORDER": " ".join(order), f"BOOT_{slot}_LEFT": format(self.max_tries, "x")}

    def mark_bad(self, env: Env, slot: str) -> dict[str, str]:
        order = [s for s in self.order(env, "BOOT_ORDER", "") if s != slot]
        return {"BOOT_ORDER": " ".join(order), f"BOOT_{slot}_LEFT": "0"}


def _run(args: Sequence[str], where: str, stdin: str | None = None) -> str:
    done = run_tool(args, where, stdin=stdin)
    if _USING_DEFAULT in done.stderr:
        # With a default environment installed (/etc/u-boot-initial-env, as Yocto and Buildroot
        # ship it), libubootenv reads no valid copy, says so on stderr, and exits 0 with the
        # defaults: a corrupt env would be silently replaced by them.
        raise corrupt(where, f"{args[0]}: no valid copy (libubootenv fell back to its defaults)")
    return done.stdout


class UBootBootControl(EnvBootControl):
    kind = "uboot"

    def __init__(
        self,
        *,
        config: Path,
        slots: Sequence[str] = DEFAULT_SLOTS,
        max_tries: int = 3,
        printenv: str = "/usr/bin/fw_printenv",
        setenv: str = "/usr/bin/fw_setenv",
    ) -> None:
        super().__init__(scheme=UBootScheme(slots=slots, max_tries=max_tries))
        self.config = config
        self.printenv = printenv
        self.setenv = setenv

    @property
    def where(self) -> str:
        return f"U-Boot env ({self.config})"

    def _read_env(self) -> dict[str, str]:
        out = _run([self.printenv, "-c", str(self.config)], self.where)
        return parse_lines(out, self.where)

    def _write_env(self, changes: Mapping[str, str]) -> None:
        script = "".join(f"{k}={v}\n" for k, v in changes.items())
        _run([self.setenv, "-c", str(self.config), "-s", "-"], self.where, stdin=script)
