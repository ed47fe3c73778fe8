"""GRUB environment block through grub-editenv, with RAUC's variables.

`ORDER` ("A B"), `A_OK`/`B_OK` (1: the slot may boot), `A_TRY`/`B_TRY` (1: it was tried and not
marked good since). RAUC's grub.cfg boots the first slot of ORDER with OK=1 and TRY=0 and sets
its TRY=1 before booting it, so each slot gets one try until marked good. A variable missing
from the block takes the value RAUC's grub.conf sets before `load_env`: ORDER="A B", A_OK=0,
B_OK=0, A_TRY=0, B_TRY=0 (an empty grubenv boots nothing, and we say so).

grub-editenv rewrites its file in place, so we edit a copy next to it and rename the copy over
the original (atomic on the same filesystem); the copy gets the original's owner and mode
(never wider than 0644) whatever the umask. A symlinked grubenv is written through to its
target (see `_target`). The block has no checksum: we require GRUB's
header line, a size that is a multiple of 512, grub-editenv's own acceptance, and valid values.
"""

from __future__ import annotations

import contextlib
import os
import stat
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
            ok = self._flag(env, f"{s}_OK", 0, where)  # RAUC's grub.conf: A_OK=0 B_OK=0
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
        editenv: str = "/usr/bin/grub-editenv",
    ) -> None:
        super().__init__(scheme=GrubScheme(slots=slots, max_tries=1))
        self.env_file = env_file
        self.editenv = editenv

    @property
    def where(self) -> str:
        return f"GRUB env ({self.env_file})"

    def _tool(self, *args: str) -> str:
        return run_tool([self.editenv, *args], self.where).stdout

    def _target(self) -> Path:
        """The file the block lives in, resolved once per operation. A symlinked grubenv (as
        Fedora links /boot/grub2/grubenv into the EFI partition) is written through to its
        target, which must be a regular file in a directory that only root (or we) can write;
        the new copy is renamed over the target, so the link stays a link."""
        try:
            target = Path(os.path.realpath(self.env_file, strict=True))
            parent = os.stat(target.parent)
        except OSError as e:
            raise BootControlError(f"cannot read {self.where}: {e.strerror or e}") from e
        if target != self.env_file and (
            parent.st_uid not in (0, os.geteuid()) or parent.st_mode & 0o022
        ):
            raise BootControlError(
                f"{self.where} is a symlink to {target}, whose directory others can write: refused"
            )
        return target

    def _read_block(self, path: Path) -> tuple[bytes, os.stat_result]:
        """The block's bytes and its fstat, opened without following a symlink and without
        blocking on a FIFO; anything but a regular GRUB block of sane size is corrupt."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise BootControlError(f"cannot read {self.where}: {e.strerror}") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise corrupt(self.where, f"{path} is not a regular file")
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read(MAX_ENV_BYTES + 1)
        except OSError as e:
            raise BootControlError(f"cannot read {self.where}: {e.strerror}") from e
        finally:
            os.close(fd)
        if not data.startswith(HEADER) or len(data) % 512 or len(data) > MAX_ENV_BYTES:
            raise corrupt(self.where, "not a GRUB environment block (header or size)")
        return data, st

    def _read_env(self) -> dict[str, str]:
        target = self._target()
        self._read_block(target)
        return parse_lines(self._tool(str(target), "list"), self.where)

    def _write_env(self, changes: Mapping[str, str]) -> None:
        target = self._target()
        data, original = self._read_block(target)
        tmp = temp_name(target)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
            with os.fdopen(fd, "wb") as dst:
                dst.write(data)
            self._tool(str(tmp), "set", *(f"{k}={v}" for k, v in changes.items()))
            self._read_block(tmp)
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                # The original's owner and mode, whatever our umask, and never wider than 0644:
                # whoever can write this block picks the slot that boots.
                if (original.st_uid, original.st_gid) != (os.geteuid(), os.getegid()):
                    os.fchown(fd, original.st_uid, original.st_gid)
                os.fchmod(fd, stat.S_IMODE(original.st_mode) & 0o644)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
            fsync_dir(target.parent)
        except OSError as e:
            raise BootControlError(f"cannot write {self.where}: {e.strerror}") from e
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
