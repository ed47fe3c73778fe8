"""The disk behind the `Storage` and `Lock` seams: `hal.storage`'s atomic files and `hal.lock`'s
flock, as objects agent/ receives from `agent/wiring.py` (tests may pass their own)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from hal import lock as _lock
from hal import storage as _storage

__all__ = ["FileStorage", "FlockLock"]


#: a file written `shared` when a group is set: the group reads it, nobody else
SHARED_FILE_MODE = 0o640


class FileStorage:
    def __init__(self, *, group: int | None = None) -> None:
        #: the gid of `paths.identity_group`, or None: nothing is shared
        self.group = group

    def ensure_private_dir(self, path: Path) -> Path:
        return _storage.ensure_private_dir(path, group=self.group)

    def ensure_shared_dir(self, path: Path, *, listable: bool = True) -> Path:
        if self.group is None:
            return _storage.ensure_private_dir(path)
        mode = 0o750 if listable else 0o710
        return _storage.ensure_private_dir(path, group=self.group, shared_mode=mode)

    def fsync_dir(self, path: Path) -> None:
        _storage.fsync_dir(path)

    def atomic_write(self, path: Path, data: bytes, *, shared: bool = False) -> None:
        if shared and self.group is not None:
            _storage.atomic_write(path, data, mode=SHARED_FILE_MODE, group=self.group)
        else:
            _storage.atomic_write(path, data)

    def atomic_symlink(self, target: str, link: Path, *, shared: bool = False) -> None:
        _storage.atomic_symlink(target, link, group=self.group if shared else None)

    def read_bytes(self, path: Path, *, limit: int) -> bytes:
        return _storage.read_bytes(path, limit=limit)


class FlockLock:
    def exclusive(
        self, path: Path, *, wait: bool, holder: str
    ) -> contextlib.AbstractContextManager[None]:
        return _lock.exclusive_lock(path, wait=wait, holder=holder)
