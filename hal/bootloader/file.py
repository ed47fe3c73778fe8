"""A plain-file boot environment for development and CI: U-Boot's RAUC variables in a text
file with a CRC-32 line, written atomically. Nothing boots from it; the file stands in for a
bootloader so the whole install/commit/rollback cycle can run on any machine."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from hal.bootloader.base import DEFAULT_SLOTS, EnvBootControl, corrupt, parse_lines
from hal.bootloader.uboot import UBootScheme
from hal.errors import BootControlError, StorageError
from hal.storage import atomic_write, read_bytes

MAX_ENV_BYTES = 64 * 1024
_PREFIX = "# devid-agent boot env crc32="


class FileBootControl(EnvBootControl):
    kind = "file"

    def __init__(self, *, path: Path, slots: Sequence[str] = DEFAULT_SLOTS, max_tries: int = 3):
        super().__init__(scheme=UBootScheme(slots=slots, max_tries=max_tries))
        self.path = path

    @property
    def where(self) -> str:
        return f"file env ({self.path})"

    def _read_env(self) -> dict[str, str]:
        if not self.path.exists():
            return {}  # a fresh environment: RAUC's defaults
        try:
            text = read_bytes(self.path, limit=MAX_ENV_BYTES).decode("ascii")
        except (StorageError, UnicodeDecodeError) as e:
            raise corrupt(self.where, str(e)) from e
        head, _, body = text.partition("\n")
        if head != f"{_PREFIX}{zlib.crc32(body.encode()):08x}":
            raise corrupt(self.where, "CRC-32 mismatch")
        return parse_lines(body, self.where)

    def _write_env(self, changes: Mapping[str, str]) -> None:
        env = {**self._read_env(), **changes}
        body = "".join(f"{k}={v}\n" for k, v in sorted(env.items()))
        try:
            atomic_write(self.path, f"{_PREFIX}{zlib.crc32(body.encode()):08x}\n{body}".encode())
        except StorageError as e:
            raise BootControlError(str(e)) from e
