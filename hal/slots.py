"""A/B slots (block devices or plain files) and which one is booted (the kernel command line).

A slot is written in place from offset 0: a file slot is never truncated or renamed, because on
a device it is a partition. The booted slot comes from `rauc.slot=A` (the key is configurable)
on the kernel command line, as RAUC's boot scripts put it there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from agent.errors import BootControlError, StorageError

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

    def __init__(self, *, name: str, path: Path, mounts: Path = DEFAULT_MOUNTS) -> None:
        self.name = name
        self.path = str(path)
        self.mounts = mounts

    def mounted_at(self) -> str | None:
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

    def capacity(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                return os.lseek(fd, 0, os.SEEK_END)  # works for block devices and files
            finally:
                os.close(fd)
        except OSError as e:
            raise StorageError(f"slot {self.name} ({self.path}): {e.strerror}") from e

    @contextmanager
    def open_write(self) -> Iterator[BinaryIO]:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW)
            f = os.fdopen(fd, "wb", buffering=0)
        except OSError as e:
            raise StorageError(f"slot {self.name} ({self.path}): {e.strerror}") from e
        with f:
            yield f
            try:
                os.fsync(f.fileno())
            except OSError as e:
                raise StorageError(f"slot {self.name} ({self.path}): fsync: {e.strerror}") from e

    @contextmanager
    def open_read(self) -> Iterator[BinaryIO]:
        try:
            f = open(self.path, "rb", buffering=0)  # noqa: SIM115 - returned to the caller
        except OSError as e:
            raise StorageError(f"slot {self.name} ({self.path}): {e.strerror}") from e
        with f:
            yield f


def booted_slot(cmdline: Path, key: str = "rauc.slot") -> str:
    """The slot name after `key=` on the kernel command line at `cmdline`."""
    try:
        with open(cmdline, "rb") as f:
            text = f.read(MAX_CMDLINE_BYTES).decode("ascii", "replace")
    except OSError as e:
        raise BootControlError(f"cannot read the kernel command line {cmdline}: {e}") from e
    for word in text.split():
        name, sep, value = word.partition("=")
        if sep and name == key and value:
            return value
    raise BootControlError(
        f"{cmdline} names no booted slot ({key}=...); is the boot script setting it?"
    )
