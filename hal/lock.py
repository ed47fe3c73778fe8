"""Exclusive advisory locks on files (flock), for the state that one process at a time may change:
the identity store (enroll, renew) and the firmware state (an OTA hook and the mark-good service).

flock, not a PID file: the kernel drops the lock when its holder exits or is killed, so a crash
never leaves it stale. The file stays (unlinking it would let a third process lock a new inode
while the second still holds the old one).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from hal.errors import Busy, StorageError


@contextlib.contextmanager
def exclusive_lock(
    path: Path, *, wait: bool = True, holder: str = "another process"
) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created 0600 if missing) for the block.

    With `wait`, block until the current holder releases it; without, raise `Busy` at once,
    naming `holder` (what the other process is doing) and the lock file.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StorageError(f"cannot open lock file {path}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise Busy(f"{holder} (it holds {path}); try again when it is done") from e
        except OSError as e:
            raise StorageError(f"cannot lock {path}: {e.strerror}") from e
        yield
    finally:
        os.close(fd)  # releases the lock
