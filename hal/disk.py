"""The disk behind the `Storage` and `Lock` seams: `hal.storage`'s atomic files and `hal.lock`'s
flock, as objects agent/ receives from `agent/wiring.py` (tests may pass their own)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from hal import lock as _lock
from hal import storage as _storage

__all__ = ["FileStorage", "FlockLock"]


class FileStorage:
    def ensure_private_dir(self, path: Path) -> Path:
        return _storage.ensure_private_dir(path)

    def fsync_dir(self, path: Path) -> None:
        _storage.fsync_dir(path)

    def atomic_write(self, path: Path, data: bytes) -> None:
        _storage.atomic_write(path, data)

    def atomic_symlink(self, target: str, link: Path) -> None:
        _storage.atomic_symlink(target, link)

    def read_bytes(self, path: Path, *, limit: int) -> bytes:
        return _storage.read_bytes(path, limit=limit)


class FlockLock:
    def exclusive(
        self, path: Path, *, wait: bool, holder: str
    ) -> contextlib.AbstractContextManager[None]:
        return _lock.exclusive_lock(path, wait=wait, holder=holder)
