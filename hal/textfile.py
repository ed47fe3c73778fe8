"""A public file replaced atomically (node_exporter's textfile collector reads it by path).

Temp file beside it (`O_CREAT | O_EXCL | O_NOFOLLOW`, so a planted name is never followed),
exact mode through `fchmod` (0644: metrics are public), fsync, rename over the target (which
replaces a planted symlink rather than following it), fsync the directory. A reader sees the
old file or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from hal.errors import StorageError

PUBLIC_MODE = 0o644


def write_public(path: Path, data: bytes, *, mode: int = PUBLIC_MODE) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(6)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StorageError(f"cannot write {path}: {e.strerror}") from e
