"""Identity generations on disk: permissions, atomic `current`, previous kept, old pruned."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import StorageError
from agent.identity import IdentityStore
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
    store = IdentityStore(state_dir=tmp_path / "state")
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
    store = IdentityStore(state_dir=tmp_path, generations_kept=2)
    for expected in range(1, 5):
        assert install(store, test_ca) == expected
    assert store.generations() == [3, 4]
    assert store.current_generation() == 4


def test_partial_generation_from_a_crash_is_skipped_and_pruned(
    tmp_path: Path, test_ca: TestCA
) -> None:
    store = IdentityStore(state_dir=tmp_path, generations_kept=2)
    install(store, test_ca)
    (store.root / "gen-2").mkdir()  # a crash after mkdir, before `current` moved
    assert store.current_generation() == 1
    assert install(store, test_ca) == 3
    assert store.generations() == [1, 3]  # the previous current stays, the debris goes


def test_broken_current_link_is_a_storage_error(tmp_path: Path) -> None:
    store = IdentityStore(state_dir=tmp_path)
    store.root.mkdir()
    os.symlink("elsewhere", store.current_link)
    with pytest.raises(StorageError, match="not a gen-N directory"):
        store.current()
