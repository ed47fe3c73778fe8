"""Atomic, private file storage: write temp -> fsync -> rename -> fsync dir; files 0600, dirs 0700.

A reader (or a power cut) sees either the old bytes or the new bytes, never a mix.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from agent.errors import StorageError

FILE_MODE = 0o600
DIR_MODE = 0o700


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) as 0700 if missing; tighten an existing dir's mode to 0700."""
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        if path.stat().st_mode & 0o077:
            os.chmod(path, DIR_MODE)
    except OSError as e:
        raise StorageError(f"cannot create private directory {path}: {e.strerror}") from e
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = FILE_MODE) -> None:
    """Replace `path` with `data` atomically and durably. The parent directory must exist."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)  # O_CREAT's mode is filtered by umask; be exact
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(f"cannot write {path}: {e.strerror}") from e


def atomic_symlink(target: str, link: Path) -> None:
    """Point `link` at `target` atomically (symlink a temp name, then rename over `link`)."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, link)
        fsync_dir(link.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(f"cannot point {link} at {target}: {e.strerror}") from e


def read_bytes(path: Path, *, limit: int = 16 * 1024 * 1024) -> bytes:
    """Read a whole file of bounded size, with a StorageError naming the file on failure."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror}") from e
    if len(data) > limit:
        raise StorageError(f"{path} is larger than {limit} bytes")
    return data
