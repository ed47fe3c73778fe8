"""The device identity on disk: generations beside a pointer to the current one.

    state_dir/identity/gen-N/{key.tss2.pem|key.pem, cert.pem, chain.pem}
    state_dir/identity/current -> gen-N        (a symlink, swapped atomically by rename)
    state_dir/cacerts.pem                      (the EST CA certificates)

A new generation is completely written and fsynced before `current` moves, so a reader (or a
power cut) sees the old identity or the new one, never a mix. The previous generation is kept
for rollback and inspection; older ones are pruned. Files are 0600, directories 0700.

cert.pem holds the device certificate alone; chain.pem the issuing chain above it (intermediates
first, the root last).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.errors import StorageError
from hal.storage import atomic_symlink, atomic_write, ensure_private_dir, read_bytes

log = logging.getLogger(__name__)

_GEN = re.compile(r"^gen-(\d+)$")
KEY_FILE_NAMES = ("key.tss2.pem", "key.pem")


@dataclass(frozen=True)
class Identity:
    generation: int
    directory: Path  # the gen-N directory (resolved, not through `current`)
    key_file: Path
    cert_file: Path
    chain_file: Path
    certificate: x509.Certificate

    @property
    def key_in_tpm(self) -> bool:
        return self.key_file.name == "key.tss2.pem"

    def key_blob(self) -> bytes:
        return read_bytes(self.key_file, limit=64 * 1024)


def _pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


class IdentityStore:
    def __init__(self, *, state_dir: Path, generations_kept: int = 3) -> None:
        self.state_dir = state_dir
        self.root = state_dir / "identity"
        self.current_link = self.root / "current"
        self.cacerts_file = state_dir / "cacerts.pem"
        self.generations_kept = max(2, generations_kept)

    def generations(self) -> list[int]:
        """Generation numbers present on disk, ascending."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StorageError(f"cannot list {self.root}: {e.strerror}") from e
        return sorted(int(m.group(1)) for n in names if (m := _GEN.match(n)))

    def current_generation(self) -> int | None:
        """The generation `current` points at, or None before the first enrollment."""
        try:
            target = os.readlink(self.current_link)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(f"cannot read {self.current_link}: {e.strerror}") from e
        match = _GEN.match(target)
        if match is None:
            raise StorageError(f"{self.current_link} points at {target!r}, not a gen-N directory")
        return int(match.group(1))

    def current(self) -> Identity | None:
        """The identity `current` points at, or None before the first enrollment."""
        generation = self.current_generation()
        return None if generation is None else self._load(generation)

    def _load(self, generation: int) -> Identity:
        directory = self.root / f"gen-{generation}"
        key_file = next((directory / n for n in KEY_FILE_NAMES if (directory / n).is_file()), None)
        if key_file is None:
            raise StorageError(f"{directory}: no key file ({' or '.join(KEY_FILE_NAMES)})")
        cert_file = directory / "cert.pem"
        try:
            cert = x509.load_pem_x509_certificate(read_bytes(cert_file, limit=256 * 1024))
        except ValueError as e:
            raise StorageError(f"{cert_file}: not a PEM certificate: {e}") from e
        return Identity(
            generation=generation,
            directory=directory,
            key_file=key_file,
            cert_file=cert_file,
            chain_file=directory / "chain.pem",
            certificate=cert,
        )

    def install(
        self,
        *,
        key_blob: bytes,
        key_file_name: str,
        certificate: x509.Certificate,
        chain: Sequence[x509.Certificate],
        ca_certs: Sequence[x509.Certificate],
    ) -> Identity:
        """Write a new generation, then the CA certificates, then move `current` to it."""
        if key_file_name not in KEY_FILE_NAMES:
            raise StorageError(f"unexpected key file name {key_file_name!r}")
        ensure_private_dir(self.root)
        previous = self.current_generation()
        existing = self.generations()
        generation = (existing[-1] if existing else 0) + 1
        directory = self.root / f"gen-{generation}"
        try:
            os.mkdir(directory, 0o700)
        except OSError as e:
            raise StorageError(f"cannot create {directory}: {e.strerror}") from e
        atomic_write(directory / key_file_name, key_blob)
        atomic_write(directory / "cert.pem", _pem([certificate]))
        atomic_write(directory / "chain.pem", _pem(chain))
        atomic_write(self.cacerts_file, _pem(ca_certs))
        atomic_symlink(directory.name, self.current_link)
        log.info("identity generation %d is now current", generation)
        self._prune(keep={generation, previous or generation})
        return self._load(generation)

    def _prune(self, *, keep: set[int]) -> None:
        """Delete generations beyond `generations_kept`: the new and the previous current one
        always stay, then the newest of the rest (a crash may have left a partial one)."""
        others = [g for g in self.generations() if g not in keep]
        spare = max(0, self.generations_kept - len(keep))
        for generation in others[: max(0, len(others) - spare)]:
            directory = self.root / f"gen-{generation}"
            try:
                shutil.rmtree(directory)
            except OSError as e:  # not fatal: the new identity is in place
                log.warning("could not prune %s: %s", directory, e)
