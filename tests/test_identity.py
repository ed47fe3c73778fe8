"""Identity generations on disk: permissions, atomic `current`, previous kept, old pruned."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import Busy, StorageError
from agent.identity import IdentityStore
from hal.disk import FileStorage, FlockLock
from tests.support.ca import TestCA


def install(store: IdentityStore, ca: TestCA, name: str = "key.pem") -> int:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(key.public_key(), subject="gw-1")
    identity = store.install(
        key_blob=b"KEY", key_file_name=name, certificate=cert, chain=[ca.cert], ca_certs=[ca.cert]
    )
    assert identity.certificate == cert
    return identity.generation


def test_first_install_layout_and_modes(tmp_path: Path, test_ca: TestCA) -> None:
    store = IdentityStore(storage=FileStorage(), lock=FlockLock(), state_dir=tmp_path / "state")
    assert store.current() is None
    assert install(store, test_ca, "key.tss2.pem") == 1
    current = store.current()
    assert current is not None and current.key_in_tpm
    assert os.readlink(store.current_link) == "gen-1"
    for path in (store.root, current.directory):
        assert path.stat().st_mode & 0o777 == 0o700
    for name in ("key.tss2.pem", "cert.pem", "chain.pem"):
        assert (current.directory / name).stat().st_mode & 0o777 == 0o600
    assert store.cacerts_file.stat().st_mode & 0o777 == 0o600
    assert (store.current_link / "cert.pem").read_bytes() == current.cert_file.read_bytes()


def test_previous_generation_kept_older_pruned(tmp_path: Path, test_ca: TestCA) -> None:
    store = IdentityStore(
        storage=FileStorage(), lock=FlockLock(), state_dir=tmp_path, generations_kept=2
    )
    for expected in range(1, 5):
        assert install(store, test_ca) == expected
    assert store.generations() == [3, 4]
    assert store.current_generation() == 4


def test_partial_generation_from_a_crash_is_skipped_and_pruned(
    tmp_path: Path, test_ca: TestCA
) -> None:
    store = IdentityStore(
        storage=FileStorage(), lock=FlockLock(), state_dir=tmp_path, generations_kept=2
    )
    install(store, test_ca)
    (store.root / "gen-2").mkdir()  # a crash after mkdir, before `current` moved
    assert store.current_generation() == 1
    assert install(store, test_ca) == 3
    assert store.generations() == [1, 3]  # the previous current stays, the debris goes


def test_broken_current_link_is_a_storage_error(tmp_path: Path) -> None:
    store = IdentityStore(storage=FileStorage(), lock=FlockLock(), state_dir=tmp_path)
    store.root.mkdir()
    os.symlink("elsewhere", store.current_link)
    with pytest.raises(StorageError, match="not a gen-N directory"):
        store.current()


def test_numbering_never_reuses_the_number_current_names(tmp_path: Path, test_ca: TestCA) -> None:
    store = IdentityStore(
        storage=FileStorage(), lock=FlockLock(), state_dir=tmp_path, generations_kept=2
    )
    install(store, test_ca)
    os.symlink("gen-2", store.root / ".next")  # `current` naming a directory that is gone
    os.replace(store.root / ".next", store.current_link)
    # gen-2 must not be created: `current` would name it while it is half-written
    assert install(store, test_ca) == 3


def test_state_dir_and_identity_dirs_are_private_even_when_created_here(
    tmp_path: Path, test_ca: TestCA
) -> None:
    old = os.umask(0o022)
    try:
        store = IdentityStore(
            storage=FileStorage(),
            lock=FlockLock(),
            state_dir=tmp_path / "var" / "lib" / "devid-agent",
        )
        install(store, test_ca)
    finally:
        os.umask(old)
    for path in (store.state_dir, store.root):
        assert path.stat().st_mode & 0o777 == 0o700


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    store = IdentityStore(storage=FileStorage(), lock=FlockLock(), state_dir=tmp_path / "state")
    other = IdentityStore(storage=FileStorage(), lock=FlockLock(), state_dir=tmp_path / "state")
    with store.exclusive():
        assert store.lock_file.stat().st_mode & 0o777 == 0o600
        busy = f"another devid-agent process .* {store.lock_file}"
        with pytest.raises(Busy, match=busy), other.exclusive():
            pass
    with other.exclusive():  # released on exit
        pass


def test_crash_debris_is_pruned_before_complete_generations(
    tmp_path: Path, test_ca: TestCA
) -> None:
    store = IdentityStore(
        storage=FileStorage(), lock=FlockLock(), state_dir=tmp_path, generations_kept=3
    )
    install(store, test_ca)
    install(store, test_ca)  # gen-1 complete, gen-2 current
    partial = store.root / "gen-3"
    partial.mkdir()
    (partial / "key.pem").write_bytes(b"KEY")  # a crash before cert.pem was written
    assert store.current_generation() == 2  # the crash left the old identity in charge
    assert install(store, test_ca) == 4
    assert store.generations() == [1, 2, 4]  # gen-1 is a real fallback; gen-3 was never one


@pytest.mark.parametrize("crash_at", range(6))
def test_a_crash_at_any_write_leaves_a_usable_identity(
    tmp_path: Path, test_ca: TestCA, crash_at: int
) -> None:
    """Writes of install(): key, cert, chain, fullchain, the `current` swap, cacerts. A crash (the
    process stops at write number `crash_at`) leaves the old identity or the new one."""
    store = IdentityStore(
        storage=FileStorage(), lock=FlockLock(), state_dir=tmp_path, generations_kept=2
    )
    install(store, test_ca)

    class Crash(BaseException):
        pass

    class CrashingStorage(FileStorage):
        """The disk through the Storage seam, stopping the process at write `crash_at`."""

        writes = 0

        def _count(self) -> None:
            if self.writes == crash_at:
                raise Crash
            self.writes += 1

        def atomic_write(self, path: Path, data: bytes, *, shared: bool = False) -> None:
            self._count()
            super().atomic_write(path, data, shared=shared)

        def atomic_symlink(self, target: str, link: Path, *, shared: bool = False) -> None:
            self._count()
            super().atomic_symlink(target, link, shared=shared)

    crashing = IdentityStore(
        storage=CrashingStorage(), lock=FlockLock(), state_dir=tmp_path, generations_kept=2
    )
    with pytest.raises(Crash):
        install(crashing, test_ca)
    after = IdentityStore(
        storage=FileStorage(), lock=FlockLock(), state_dir=tmp_path, generations_kept=2
    ).current()
    assert after is not None
    assert after.generation == (1 if crash_at <= 4 else 2)  # write 4 is the `current` swap
    assert after.key_file.read_bytes() == b"KEY" and after.chain_file.is_file()
    assert install(store, test_ca) == 3  # the next run carries on
    assert store.current_generation() == 3
