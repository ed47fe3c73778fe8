"""A/B slots (block devices or plain files) and which one is booted (the kernel command line).

A slot is written in place from offset 0: a file slot is never truncated or renamed, because on
a device it is a partition. The booted slot comes from `rauc.slot=A` (the key is configurable)
on the kernel command line, as RAUC's boot scripts put it there.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import BinaryIO, cast

from hal import faults
from hal.errors import BootControlError, StorageError

MAX_CMDLINE_BYTES = 64 * 1024
MAX_MOUNTS_BYTES = 4 * 1024 * 1024
DEFAULT_MOUNTS = Path("/proc/self/mounts")


def _unescape(field: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


class DeviceSlot:
    """A slot backed by a block device or a file of fixed size."""

    def __init__(
        self, *, name: str, path: Path, mounts: Path = DEFAULT_MOUNTS, root: Path = Path("/")
    ) -> None:
        self.name = name
        self.path = str(path)
        self.mounts = mounts
        self.root = root

    def mounted_at(self) -> str | None:
        if self._holds_root():
            return str(self.root)
        try:
            with open(self.mounts, "rb") as f:
                text = f.read(MAX_MOUNTS_BYTES).decode("utf-8", "replace")
        except OSError as e:
            raise StorageError(f"cannot read {self.mounts}: {e.strerror}") from e
        target = os.path.realpath(self.path)
        for line in text.splitlines():
            fields = line.split()
            source = _unescape(fields[0]) if len(fields) >= 2 else ""
            if source.startswith("/") and os.path.realpath(source) == target:
                return _unescape(fields[1])
        return None

    def _holds_root(self) -> bool:
        """The root filesystem is often listed as /dev/root in /proc/self/mounts, a name that
        matches no slot path; its device number does not lie."""
        try:
            info = os.stat(self.path)
            return stat.S_ISBLK(info.st_mode) and info.st_rdev == os.stat(self.root).st_dev
        except OSError:
            return False

    def capacity(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                return os.lseek(fd, 0, os.SEEK_END)  # works for block devices and files
            finally:
                os.close(fd)
        except OSError as e:
            raise StorageError(f"slot {self.name} ({self.path}): {e.strerror}") from e

    def open_write(self) -> AbstractContextManager[BinaryIO]:
        """Symlinks are followed: slots are configured by root, typically as
        /dev/disk/by-partlabel/... links. The data is fsynced when the block ends cleanly."""
        return self._open("r+b", "write")

    def open_read(self) -> AbstractContextManager[BinaryIO]:
        """Reads come from the medium, not from pages cached by the write: a read-back that
        only proves the page cache is worth little."""
        return self._open("rb", "read")

    @contextmanager
    def _open(self, mode: str, doing: str) -> Iterator[BinaryIO]:
        """Errors while using the file (EIO, ENOSPC) become StorageError here too, so callers
        see one error type, naming the slot, from every step."""
        try:
            f = open(self.path, mode, buffering=0)  # noqa: SIM115 - closed below
        except OSError as e:
            raise StorageError(f"slot {self.name} ({self.path}): open: {e.strerror}") from e
        with f:
            try:
                if "+" not in mode:  # clean (fsynced) pages are dropped; best effort
                    with suppress(OSError):
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                if "+" in mode and faults.armed():
                    yield cast(BinaryIO, _CrashPoints(cast(BinaryIO, f), self.name))
                else:
                    yield cast(BinaryIO, f)  # open() types a run-time mode as IO[Any]
                if "+" in mode:
                    faults.point(f"fsync slot {self.name}")
                    os.fsync(f.fileno())
            except OSError as e:
                raise StorageError(f"slot {self.name} ({self.path}): {doing}: {e.strerror}") from e


class _CrashPoints:
    """A slot writer with a crash point before every chunk (hal.faults; tests only)."""

    def __init__(self, f: BinaryIO, name: str) -> None:
        self._f = f
        self._name = name

    def write(self, data: bytes) -> int | None:
        faults.point(f"write slot {self._name}")
        return self._f.write(data)

    def fileno(self) -> int:
        return self._f.fileno()


def booted_slot(cmdline: Path, key: str = "rauc.slot") -> str:
    """The slot name after `key=` on the kernel command line at `cmdline`."""
    try:
        with open(cmdline, "rb") as f:
            text = f.read(MAX_CMDLINE_BYTES).decode("ascii", "replace")
    except OSError as e:
        raise BootControlError(f"cannot read the kernel command line {cmdline}: {e}") from e
    found = set()
    for word in text.split():
        name, sep, value = word.partition("=")
        if sep and name == key:
            found.add(value)
    if len(found) > 1 or "" in found:
        # Which one the kernel or init honours is not ours to guess: guessing wrong would
        # make the booted slot the install target.
        raise BootControlError(
            f"{cmdline} names the booted slot ambiguously: {key}={sorted(found)}"
        )
    if not found:
        raise BootControlError(
            f"{cmdline} names no booted slot ({key}=...); is the boot script setting it?"
        )
    return found.pop()
