"""U-Boot environment through libubootenv's fw_printenv/fw_setenv, with RAUC's variables.

`BOOT_ORDER` ("A B": try A first), `BOOT_A_LEFT`/`BOOT_B_LEFT` (boots left before the slot is
skipped). RAUC's boot script decrements `BOOT_x_LEFT` on every boot of a slot and takes the first
slot of `BOOT_ORDER` with tries left; marking good refills the tries. All changes of one
operation go to fw_setenv in one script, which libubootenv writes as one new copy of a
redundant environment (the older copy survives a power cut). A missing variable takes the
default RAUC's script sets ("A B", max tries). libubootenv checks the CRC: when no copy is
valid, fw_printenv fails and we refuse to touch anything.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from agent.errors import BootControlError
from hal.bootloader.base import Env, EnvBootControl, Scheme, parse_lines
from hal.interfaces import BootState

TOOL_TIMEOUT_S = 30.0


class UBootScheme(Scheme):
    def state(self, env: Env, where: str) -> BootState:
        order = self.order(env, "BOOT_ORDER", where)
        left = {s: self.number(env, f"BOOT_{s}_LEFT", self.max_tries, where) for s in self.slots}
        return BootState(order=order, tries_left=left)

    def set_primary(self, env: Env, slot: str, tries: int) -> dict[str, str]:
        order = [s for s in self.order(env, "BOOT_ORDER", "") if s != slot]
        return {"BOOT_ORDER": " ".join([slot, *order]), f"BOOT_{slot}_LEFT": str(tries)}

    def mark_good(self, env: Env, slot: str) -> dict[str, str]:
        order = list(self.order(env, "BOOT_ORDER", ""))
        if slot not in order:
            order.append(slot)
        return {"BOOT_ORDER": " ".join(order), f"BOOT_{slot}_LEFT": str(self.max_tries)}

    def mark_bad(self, env: Env, slot: str) -> dict[str, str]:
        order = [s for s in self.order(env, "BOOT_ORDER", "") if s != slot]
        return {"BOOT_ORDER": " ".join(order), f"BOOT_{slot}_LEFT": "0"}


def _run(args: Sequence[str], what: str, stdin: str | None = None) -> str:
    try:
        done = subprocess.run(
            list(args), input=stdin, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BootControlError(f"cannot run {args[0]} for {what}: {e}") from e
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise BootControlError(f"{args[0]} failed on {what}: {reason}")
    return done.stdout


class UBootBootControl(EnvBootControl):
    kind = "uboot"

    def __init__(
        self,
        *,
        config: Path,
        slots: Sequence[str] = ("A", "B"),
        max_tries: int = 3,
        printenv: str = "fw_printenv",
        setenv: str = "fw_setenv",
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
        return parse_lines(out)

    def _write_env(self, changes: Mapping[str, str]) -> None:
        script = "".join(f"{k}={v}\n" for k, v in changes.items())
        _run([self.setenv, "-c", str(self.config), "-s", "-"], self.where, stdin=script)
