"""GRUB environment block through grub-editenv, with RAUC's variables.

`ORDER` ("A B"), `A_OK`/`B_OK` (1: the slot may boot), `A_TRY`/`B_TRY` (1: it was tried and not
marked good since). RAUC's grub.cfg boots the first slot of ORDER with OK=1 and TRY=0 and sets
its TRY=1 before booting it, so each slot gets one try until marked good.

grub-editenv rewrites its file in place, so we edit a copy next to it and rename the copy over
the original (atomic on the same filesystem). The block has no checksum: we require GRUB's
header line, a size that is a multiple of 512, grub-editenv's own acceptance, and valid values.
"""

from __future__ import annotations

import contextlib
import os
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
from hal.errors import BootControlError
from hal.interfaces import BootState
from hal.storage import fsync_dir, temp_name

HEADER = b"# GRUB Environment Block\n"
MAX_ENV_BYTES = 64 * 1024


class GrubScheme(Scheme):
    def _flag(self, env: Env, key: str, default: int, where: str) -> int:
        value = self.number(env, key, default, where)
        if value not in (0, 1):
            raise corrupt(where, f"{key}={value} is not 0 or 1")
        return value

    def state(self, env: Env, where: str) -> BootState:
        order = self.order(env, "ORDER", where)
        left = {}
        for s in self.slots:
            ok = self._flag(env, f"{s}_OK", 1, where)
            tried = self._flag(env, f"{s}_TRY", 0, where)
            left[s] = 1 if ok and not tried else 0
        return BootState(order=order, tries_left=left)

    def set_primary(self, env: Env, slot: str, tries: int) -> dict[str, str]:
        # GRUB's scheme has exactly one try per slot; `tries` cannot be expressed.
        order = [s for s in self.order(env, "ORDER", "") if s != slot]
        return {"ORDER": " ".join([slot, *order]), f"{slot}_OK": "1", f"{slot}_TRY": "0"}

    def mark_good(self, env: Env, slot: str) -> dict[str, str]:
        order = list(self.order(env, "ORDER", ""))
        if slot not in order:
            order.append(slot)
        return {"ORDER": " ".join(order), f"{slot}_OK": "1", f"{slot}_TRY": "0"}

    def mark_bad(self, env: Env, slot: str) -> dict[str, str]:
        return {f"{slot}_OK": "0", f"{slot}_TRY": "0"}


class GrubBootControl(EnvBootControl):
    kind = "grub"

    def __init__(
        self,
        *,
        env_file: Path,
        slots: Sequence[str] = DEFAULT_SLOTS,
        editenv: str = "grub-editenv",
    ) -> None:
        super().__init__(scheme=GrubScheme(slots=slots, max_tries=1))
        self.env_file = env_file
        self.editenv = editenv

    @property
    def where(self) -> str:
        return f"GRUB env ({self.env_file})"

    def _tool(self, *args: str) -> str:
        return run_tool([self.editenv, *args], self.where).stdout

    def _check_block(self, path: Path) -> None:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_ENV_BYTES + 1)
        except OSError as e:
            raise BootControlError(f"cannot read {self.where}: {e.strerror}") from e
        if not data.startswith(HEADER) or len(data) % 512 or len(data) > MAX_ENV_BYTES:
            raise corrupt(self.where, "not a GRUB environment block (header or size)")

    def _read_env(self) -> dict[str, str]:
        self._check_block(self.env_file)
        return parse_lines(self._tool(str(self.env_file), "list"), self.where)

    def _write_env(self, changes: Mapping[str, str]) -> None:
        tmp = temp_name(self.env_file)
        try:
            with open(self.env_file, "rb") as src, open(tmp, "xb") as dst:
                dst.write(src.read(MAX_ENV_BYTES))
            self._tool(str(tmp), "set", *(f"{k}={v}" for k, v in changes.items()))
            self._check_block(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.env_file)
            fsync_dir(self.env_file.parent)
        except OSError as e:
            raise BootControlError(f"cannot write {self.where}: {e.strerror}") from e
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
