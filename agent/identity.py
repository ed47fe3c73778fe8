"""The device identity on disk: generations beside a pointer to the current one.

    state_dir/identity/gen-N/{key.tss2.pem|key.pem, cert.pem, chain.pem, fullchain.pem}
    state_dir/identity/current -> gen-N        (a symlink, swapped atomically by rename)
    state_dir/cacerts.pem                      (the EST CA certificates)
    state_dir/enroll.lock                      (held while enrolling or renewing)

A new generation is completely written and fsynced (files and directory entries) before
`current` moves, so a reader (or a power cut) sees the old identity or the new one, never a mix.
A generation a crash left half-written is never pointed at: numbers only grow, past every
directory and past `current`, and it is pruned later. The previous generation is kept for
rollback and inspection; older ones are pruned. Files are 0600, directories 0700.

With `paths.identity_group` (the storage's sharing group), other local services in that group
read the certificates through `identity/current/`: cert.pem, chain.pem and fullchain.pem are
0640 with that group, `state_dir` 0710 (entered, not listed), `identity/` and each `gen-N/` 0750,
and `current` has the group too. The key file stays 0600 and the group can write nothing. Each
new generation is written so; generations written before the option was set keep their modes
(the next rotation makes a shared one current; `doctor` says which are not shared).

Enrolling and renewing hold an exclusive advisory lock (flock on enroll.lock), so the daemon and
a CLI run cannot both write a generation or the pending request at once.

cert.pem holds the device certificate alone; chain.pem the issuing chain above it (intermediates
first, the root last).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import AgentError, StorageError
from hal.interfaces import Lock, Storage

# cryptography is imported where certificates are read or written: `status` before the first
# enrollment does not pay for it
if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger(__name__)

_GEN = re.compile(r"^gen-(\d+)$")


@dataclass(frozen=True)
class Repair:
    """What `IdentityStore.usable` found wrong with `current`, and what it did."""

    #: the generation `current` named (None: `current` itself was unreadable)
    damaged: int | None
    reason: str
    #: the generation made current again, or None: nothing usable left, enroll afresh
    fell_back_to: int | None

    def describe(self) -> str:
        what = "current identity" if self.damaged is None else f"identity generation {self.damaged}"
        done = (
            f"fell back to generation {self.fell_back_to}"
            if self.fell_back_to is not None
            else "no other generation can serve: enrolling afresh"
        )
        return f"{what} was damaged ({self.reason}); {done}"


KEY_FILE_NAMES = ("key.tss2.pem", "key.pem")
LOCK_FILE_NAME = "enroll.lock"


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


def _pem(certs: Sequence[x509.Certificate]) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


class IdentityStore:
    def __init__(
        self, *, state_dir: Path, storage: Storage, lock: Lock, generations_kept: int = 3
    ) -> None:
        self._storage = storage
        self._lock = lock
        self.state_dir = state_dir
        self.root = state_dir / "identity"
        self.current_link = self.root / "current"
        self.cacerts_file = state_dir / "cacerts.pem"
        self.lock_file = state_dir / LOCK_FILE_NAME
        self.generations_kept = max(2, generations_kept)

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Hold the enrollment lock, or fail at once (Busy, retryable) if another process does."""
        self._storage.ensure_private_dir(self.state_dir)
        return self._lock.exclusive(
            self.lock_file,
            wait=False,
            holder="another devid-agent process is enrolling or renewing",
        )

    def key_blob(self, identity: Identity) -> bytes:
        """The identity's key blob as stored (a TSS2 PRIVATE KEY or a PEM key)."""
        return self._storage.read_bytes(identity.key_file, limit=64 * 1024)

    def cacerts_pem(self) -> bytes | None:
        """The stored EST CA certificates as PEM, or None before the first enrollment."""
        if not self.cacerts_file.exists():
            return None
        return self._storage.read_bytes(self.cacerts_file, limit=1024 * 1024)

    def replace_cacerts(self, certs: Sequence[x509.Certificate]) -> None:
        """Write the EST CA set atomically (the CA refresh; enrollment writes it in install)."""
        self._storage.ensure_private_dir(self.state_dir)
        self._storage.atomic_write(self.cacerts_file, _pem(certs))

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

    def usable(self, check: Callable[[Identity], None]) -> tuple[Identity | None, Repair | None]:
        """The current identity if it loads and passes `check` (which raises AgentError when it
        cannot serve); else the newest other generation that does, made current (self-repair);
        else None, so that the caller enrolls afresh with its bootstrap credential. A damaged
        generation is left on disk for diagnosis. Call while holding `exclusive()`."""
        try:
            current = self.current()
            if current is None:
                return None, None
            check(current)
            return current, None
        except AgentError as e:
            reason = str(e)
        damaged = self._generation_current_names()
        for generation in sorted(self.generations(), reverse=True):
            if generation == damaged:
                continue
            try:
                candidate = self._load(generation)
                check(candidate)
            except AgentError:
                continue
            self._storage.atomic_symlink(f"gen-{generation}", self.current_link, shared=True)
            log.warning(
                "identity generation %s is damaged (%s); generation %d is current again",
                damaged, reason, generation,
            )  # fmt: skip
            return candidate, Repair(damaged=damaged, reason=reason, fell_back_to=generation)
        log.warning(
            "identity generation %s is damaged (%s) and no other can serve", damaged, reason
        )
        return None, Repair(damaged=damaged, reason=reason, fell_back_to=None)

    def _generation_current_names(self) -> int | None:
        try:
            return self.current_generation()
        except AgentError:
            return None

    def _load(self, generation: int) -> Identity:
        directory = self.root / f"gen-{generation}"
        key_file = next((directory / n for n in KEY_FILE_NAMES if (directory / n).is_file()), None)
        if key_file is None:
            raise StorageError(f"{directory}: no key file ({' or '.join(KEY_FILE_NAMES)})")
        cert_file = directory / "cert.pem"
        from cryptography import x509

        try:
            cert = x509.load_pem_x509_certificate(
                self._storage.read_bytes(cert_file, limit=256 * 1024)
            )
        except (ValueError, x509.InvalidVersion) as e:  # InvalidVersion is not a ValueError
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
        prove: Callable[[Identity], None] | None = None,
    ) -> Identity:
        """Write a new generation, move `current` to it, then write the CA certificates.

        With `prove`, the new generation must pass it (a real mutual-TLS exchange with the new
        key and certificate) before `current` moves: if it raises, the old identity stays
        current, the new generation is kept aside for diagnosis, and the error propagates."""
        if key_file_name not in KEY_FILE_NAMES:
            raise StorageError(f"unexpected key file name {key_file_name!r}")
        # mkdir(parents=True) gives parents the umask's mode
        # shared: with an identity group, its members enter state_dir and read the certificates
        self._storage.ensure_shared_dir(self.state_dir, listable=False)
        self._storage.ensure_shared_dir(self.root)
        previous = self.current_generation()
        # past `current` too: should it point at a missing directory, that number must never be
        # reused for a directory that is still being written
        generation = max([0, previous or 0, *self.generations()]) + 1
        directory = self.root / f"gen-{generation}"
        try:
            os.mkdir(directory, 0o700)
        except OSError as e:
            raise StorageError(f"cannot create {directory}: {e.strerror}") from e
        self._storage.ensure_shared_dir(directory)
        self._storage.atomic_write(directory / key_file_name, key_blob)  # never shared
        self._storage.atomic_write(directory / "cert.pem", _pem([certificate]), shared=True)
        self._storage.atomic_write(directory / "chain.pem", _pem(chain), shared=True)
        # for other services (a web server, a broker client): leaf then intermediates, one file
        self._storage.atomic_write(
            directory / "fullchain.pem", _pem([certificate, *chain]), shared=True
        )
        try:
            self._storage.fsync_dir(
                self.root
            )  # gen-N's own entry is durable before `current` names it
        except OSError as e:
            raise StorageError(f"cannot sync {self.root}: {e.strerror}") from e
        if prove is not None:
            try:
                prove(self._load(generation))
            except AgentError as e:
                log.warning(
                    "identity generation %d failed its proof (%s); generation %s stays current, "
                    "the new one is kept aside in %s", generation, e, previous, directory,
                )  # fmt: skip
                raise
        self._storage.atomic_symlink(directory.name, self.current_link, shared=True)
        log.info("identity generation %d is now current", generation)
        # after the swap: a failure before it leaves every file as it was
        self._storage.atomic_write(self.cacerts_file, _pem(ca_certs))
        self._prune(keep={generation, previous or generation})
        return self._load(generation)

    def _prune(self, *, keep: set[int]) -> None:
        """Delete generations beyond `generations_kept`: the new and the previous current one
        always stay, then the newest complete ones of the rest. Incomplete ones (a crash
        before `current` moved) go first: they could never be rolled back to."""
        others = [g for g in self.generations() if g not in keep]
        complete = [g for g in others if self._complete(g)]
        spare = max(0, self.generations_kept - len(keep))
        kept = set(complete[-spare:]) if spare else set()
        for generation in others:
            if generation in kept:
                continue
            directory = self.root / f"gen-{generation}"
            try:
                import shutil  # here: pruning is rare, and shutil costs every start

                shutil.rmtree(directory)
            except OSError as e:  # not fatal: the new identity is in place
                log.warning("could not prune %s: %s", directory, e)

    def _complete(self, generation: int) -> bool:
        directory = self.root / f"gen-{generation}"
        has_key = any((directory / name).is_file() for name in KEY_FILE_NAMES)
        return has_key and all((directory / n).is_file() for n in ("cert.pem", "chain.pem"))
