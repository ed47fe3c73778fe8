"""The seams between agent/ (decisions, protocols) and hal/ (hardware, disk).

agent/ sees hardware only through these Protocols; implementations are picked in agent/wiring.py.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: firmware commands start without loading cryptography
    from cryptography.hazmat.primitives.asymmetric.types import (
        CertificateIssuerPrivateKeyTypes,
        PublicKeyTypes,
    )


class KeyAlgorithm(enum.Enum):
    """Key types the agent can create. ECC P-256 is the default: ~2 ms on a TPM, RSA up to 1 s."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"

    @property
    def is_rsa(self) -> bool:
        return self in (KeyAlgorithm.RSA_2048, KeyAlgorithm.RSA_3072)


@runtime_checkable
class KeyStore(Protocol):
    """Creates signing keys and signs with them; private keys never leave the store in the clear.

    A key is identified by its *blob*: the bytes stored on disk (a `TSS2 PRIVATE KEY` PEM that only
    this TPM can load, or a PKCS#8 PEM for software keys).
    """

    #: "tpm" or "software"; shown wherever the key store is reported.
    kind: str
    #: False for software keys: the private key is a file an attacker with root can copy.
    hardware_backed: bool
    #: the file name the key is stored under in an identity generation ("key.tss2.pem", "key.pem")
    key_file_name: str

    def generate(self, algorithm: KeyAlgorithm) -> bytes:
        """Create a new key and return its blob."""
        ...

    def signer(self, blob: bytes) -> AbstractContextManager[CertificateIssuerPrivateKeyTypes]:
        """Load the key for signing; it is unloaded (TPM context flushed) when the block ends,
        however it ends. A failure of the store itself, including the TPM failing while the
        block signs, comes out as `KeyStoreError`; the block's own exceptions pass unchanged."""
        ...

    def public_key(self, blob: bytes) -> PublicKeyTypes:
        """The key's public half."""
        ...


@runtime_checkable
class Storage(Protocol):
    """Private, atomic file storage: files 0600, directories 0700; a reader (or a power cut) sees
    the old bytes or the new, never a mix. Failures come out as `StorageError` naming the path.

    A storage may have one sharing group (`paths.identity_group`): what is written `shared` is
    then readable by that group (files 0640, directories 0750 or 0710 with that group), and a
    private directory already shared so is left as it is. Without a group, `shared` changes
    nothing: everything stays private."""

    def ensure_private_dir(self, path: Path) -> Path:
        """Create `path` (and missing parents) 0700, or check that an existing one is private."""
        ...

    def ensure_shared_dir(self, path: Path, *, listable: bool = True) -> Path:
        """As `ensure_private_dir`, then share it with the group: 0750 (`listable`) or 0710."""
        ...

    def fsync_dir(self, path: Path) -> None:
        """Make the directory's entries durable."""
        ...

    def atomic_write(self, path: Path, data: bytes, *, shared: bool = False) -> None:
        """Replace `path` with `data` (temp, fsync, rename, fsync dir); `shared`: 0640, group."""
        ...

    def atomic_symlink(self, target: str, link: Path, *, shared: bool = False) -> None:
        """Point `link` at `target`, replacing it atomically; `shared`: the link has the group."""
        ...

    def read_bytes(self, path: Path, *, limit: int) -> bytes:
        """The file's bytes; more than `limit` is an error."""
        ...


@runtime_checkable
class Lock(Protocol):
    """Exclusive locks between processes on a lock file; the kernel drops a dead holder's lock."""

    def exclusive(self, path: Path, *, wait: bool, holder: str) -> AbstractContextManager[None]:
        """Hold the lock for the block. Without `wait`, `Busy` at once when another process holds
        it, naming `holder` (what that process is doing)."""
        ...


@runtime_checkable
class MonotonicCounter(Protocol):
    """A counter that can only go up (anti-rollback security version)."""

    kind: str
    hardware_backed: bool

    def read(self) -> int: ...

    def raise_to(self, value: int) -> int:
        """Raise the counter to at least `value`; never lowers it. Returns the new value."""
        ...


@dataclass(frozen=True)
class BootState:
    """What the bootloader will do next, as read from its environment.

    `order` lists slot names in the order the bootloader tries them (it may name slots that are
    not ours, such as a recovery slot "R"); `tries_left` is how many more boots each of our slots
    may be tried before the bootloader skips it (0: it will be skipped).
    """

    order: tuple[str, ...]
    tries_left: Mapping[str, int]

    def next_boot(self) -> str | None:
        """The slot the bootloader will choose at the next boot, or None if none is bootable."""
        for slot in self.order:
            if self.tries_left.get(slot, 0) > 0:
                return slot
        return None

    def bootable(self, slot: str) -> bool:
        """The bootloader's verdict, as RAUC reads it ("good" in `rauc status`): the slot is in
        the order and has tries left. It overrides any record of ours."""
        return slot in self.order and self.tries_left.get(slot, 0) > 0


@runtime_checkable
class BootControl(Protocol):
    """The bootloader's A/B state (RAUC's variable conventions). Every method raises
    `BootControlError` on a corrupt or unreadable environment, and changes nothing then."""

    #: "uboot", "grub" or "file"
    kind: str

    def state(self) -> BootState: ...

    def set_primary(self, slot: str, *, tries: int) -> None:
        """Boot `slot` first from the next boot on, for at most `tries` boots until marked good."""
        ...

    def mark_good(self, slot: str) -> None:
        """`slot` booted and works: keep booting it (refills its tries)."""
        ...

    def mark_bad(self, slot: str) -> None:
        """Never boot `slot` (it is about to be overwritten, or it failed)."""
        ...


@runtime_checkable
class Slot(Protocol):
    """One A/B slot: a block device or a file that receives an image."""

    name: str
    path: str

    def capacity(self) -> int:
        """Bytes the slot can hold."""
        ...

    def open_write(self) -> AbstractContextManager[BinaryIO]:
        """A writer positioned at offset 0; flushed and fsynced when the block ends cleanly.
        An I/O error inside the block comes out as `StorageError` naming the slot."""
        ...

    def open_read(self) -> AbstractContextManager[BinaryIO]:
        """A reader positioned at offset 0; I/O errors come out as `StorageError`."""
        ...

    def mounted_at(self) -> str | None:
        """Where the slot is mounted, or None: a mounted slot is never written."""
        ...


@runtime_checkable
class FileStore(Protocol):
    """Small files in one private directory, none of them reachable by a planted link or FIFO
    (hal.secure_dir.DirStore): the firmware state, the counters' files, their lock."""

    def path(self, name: str) -> Path:
        """Where `name` lives, for messages."""
        ...

    def read(self, name: str, *, limit: int) -> bytes | None:
        """The file's bytes (at most `limit`), or None if it does not exist."""
        ...

    def write(self, name: str, data: bytes, *, mode: int = 0o600) -> None:
        """Replace the file atomically and durably."""
        ...

    def lock(
        self, name: str, *, wait: bool = True, holder: str = "another process"
    ) -> AbstractContextManager[None]:
        """Hold an exclusive lock on the file `name` for the block."""
        ...


@runtime_checkable
class AppendStore(FileStore, Protocol):
    """A `FileStore` that can also append and rename (hal.secure_dir.DirStore): the audit trail."""

    def append(self, name: str, data: bytes, *, mode: int = 0o600) -> int:
        """Append `data` in one O_APPEND write and fsync it; the file's new size."""
        ...

    def tail(self, name: str, *, max_bytes: int) -> tuple[int, bytes] | None:
        """(size, the last `max_bytes` bytes at most), or None if the file does not exist."""
        ...

    def rename(self, src: str, dst: str) -> bool:
        """Rename `src` over `dst` durably; False if `src` does not exist."""
        ...
