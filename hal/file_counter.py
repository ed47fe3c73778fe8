"""A monotonic counter in a file, for devices without a TPM. Weaker: anyone who can write the
state directory (root, or an attacker with the disk) can lower it; `status` reports it as not
hardware-backed."""

from __future__ import annotations

import logging
from pathlib import Path

from hal.errors import StorageError
from hal.storage import atomic_write, read_bytes

log = logging.getLogger(__name__)


class FileCounter:
    kind = "file"
    hardware_backed = False

    def __init__(self, *, path: Path) -> None:
        self.path = path

    def read(self) -> int:
        if not self.path.exists():
            return 0
        text = read_bytes(self.path, limit=64).decode("ascii", "replace").strip()
        if not text.isdigit():
            raise StorageError(f"anti-rollback counter file {self.path} is corrupt: {text!r}")
        return int(text)

    def raise_to(self, value: int) -> int:
        current = self.read()
        if value > current:
            atomic_write(self.path, f"{value}\n".encode())
            log.info("anti-rollback counter (file) raised from %d to %d", current, value)
            return value
        return current
