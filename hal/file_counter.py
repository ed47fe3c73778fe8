"""A monotonic counter in a file, for devices without a TPM. Weaker: anyone who can write the
state directory (root, or an attacker with the disk) can lower it; `status` reports it as not
hardware-backed."""

from __future__ import annotations

import logging

from hal.errors import StorageError
from hal.interfaces import FileStore

log = logging.getLogger(__name__)


class FileCounter:
    kind = "file"
    hardware_backed = False

    def __init__(self, *, store: FileStore, name: str = "security-version") -> None:
        self.store = store
        self.name = name

    def read(self) -> int:
        data = self.store.read(self.name, limit=64)
        if data is None:
            return 0
        text = data.decode("ascii", "replace").strip()
        if not (text.isascii() and text.isdigit()):
            raise StorageError(
                f"anti-rollback counter file {self.store.path(self.name)} is corrupt: {text!r}"
            )
        return int(text)

    def raise_to(self, value: int) -> int:
        current = self.read()
        if value > current:
            self.store.write(self.name, f"{value}\n".encode())
            log.info("anti-rollback counter (file) raised from %d to %d", current, value)
            return value
        return current
