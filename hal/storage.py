"""Atomic, private file storage: write temp -> fsync -> rename -> fsync dir; files 0600, dirs 0700.

A reader (or a power cut) sees either the old bytes or the new bytes, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from hal import faults
from hal.errors import StorageError
from hal.secure_dir import SecureDir, not_in_group

FILE_MODE = 0o600
DIR_MODE = 0o700
_READ_CHUNK = 1024 * 1024


def ensure_private_dir(
    path: Path, *, group: int | None = None, shared_mode: int | None = None
) -> Path:
    """Create `path` as 0700 if missing; tighten an existing dir's mode to 0700 (with `group`:
    a dir already 0750/0710 with exactly that group stays; with `shared_mode`, it is made so:
    hal.secure_dir's rule).

    Reached through hal.secure_dir's checked walk: no symlink on the way, every ancestor owned
    by root or us and writable by no one else, the directory itself ours (one owned by another
    user would let that user swap our files, or for root plant links, under us), and chmodded
    through its descriptor, never by path.
    """
    directory = SecureDir.open(
        path, create=True, private=True, group=group, shared_mode=shared_mode
    )
    assert directory is not None  # create=True never returns None
    directory.close()
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A fresh hidden name beside `path`: unique per call (threads share a PID), unguessable.
    Create it exclusively (O_EXCL, open mode "xb"), so nothing planted there is followed."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{token()}")


def token() -> str:
    """16 random hex digits (os.urandom: `secrets` would cost every start ~3 ms of imports)."""
    return os.urandom(8).hex()


def atomic_write(
    path: Path, data: bytes, *, mode: int = FILE_MODE, group: int | None = None
) -> None:
    """Replace `path` with `data` atomically and durably. The parent directory must exist.
    With `group`, the file gets that group before it is given `mode` (and before its name).

    The temp file is created with O_EXCL | O_NOFOLLOW under a fresh random name, so nothing
    planted beside `path` (a symlink, a hard link, another writer's temp file) is ever opened.
    """
    tmp = temp_name(path)
    created = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        created = True
        try:
            if group is not None:
                _chgrp(fd, path, group)
            os.fchmod(fd, mode)  # O_CREAT's mode is filtered by umask; be exact
            view = memoryview(data)
            while view:
                faults.point(f"write {path}")
                written = os.write(fd, view)
                view = view[written:]
            faults.point(f"fsync {path}")
            os.fsync(fd)
        finally:
            os.close(fd)
        faults.point(f"rename {path}")
        os.replace(tmp, path)
        created = False
        faults.point(f"fsync dir of {path}")
        fsync_dir(path.parent)
        faults.point(f"written {path}")
    except (OSError, StorageError) as e:
        if created:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(e, StorageError):  # not a member of the group
            raise
        raise StorageError(f"cannot write {path}: {e.strerror}") from e


def atomic_symlink(target: str, link: Path, *, group: int | None = None) -> None:
    """Point `link` at `target` atomically (symlink a fresh temp name, then rename over `link`);
    with `group`, the link belongs to that group (what `ls -l` shows; Linux ignores a link's
    own permissions)."""
    tmp = temp_name(link)
    created = False
    try:
        faults.point(f"symlink {link}")
        os.symlink(target, tmp)  # fails with EEXIST rather than reuse anything at that name
        created = True
        if group is not None:
            try:
                os.lchown(tmp, -1, group)
            except PermissionError as e:
                raise not_in_group(link, group) from e
        faults.point(f"rename {link}")
        os.replace(tmp, link)
        created = False
        faults.point(f"fsync dir of {link}")
        fsync_dir(link.parent)
        faults.point(f"linked {link}")
    except (OSError, StorageError) as e:
        if created:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(e, StorageError):  # not a member of the group
            raise
        raise StorageError(f"cannot point {link} at {target}: {e.strerror}") from e


def _chgrp(fd: int, path: Path, group: int) -> None:
    try:
        os.fchown(fd, -1, group)
    except PermissionError as e:
        raise not_in_group(path, group) from e


def read_bytes(path: Path, *, limit: int = 16 * 1024 * 1024) -> bytes:
    """Read a whole file of bounded size, with a StorageError naming the file on failure."""
    chunks: list[bytes] = []
    size = 0
    try:
        # O_NONBLOCK: a FIFO planted where a file should be is refused below, not waited on.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StorageError(f"{path} is not a regular file")
        with open(fd, "rb") as f:
            # In chunks: f.read(limit + 1) allocates limit + 1 bytes up front, whatever the size
            # of the file (MemoryError for a large limit on a small file).
            while size <= limit and (chunk := f.read(min(_READ_CHUNK, limit + 1 - size))):
                chunks.append(chunk)
                size += len(chunk)
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror}") from e
    if size > limit:
        raise StorageError(f"{path} is larger than {limit} bytes")
    return b"".join(chunks)
