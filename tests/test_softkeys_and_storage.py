"""Software key store and atomic private storage."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import KeyStoreError, StorageError
from hal.interfaces import KeyAlgorithm, KeyStore
from hal.softkeys import SoftwareKeyStore
from hal.storage import atomic_symlink, atomic_write, ensure_private_dir, read_bytes


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm), ids=lambda a: a.value)
def test_software_keys_sign(algorithm: KeyAlgorithm) -> None:
    store = SoftwareKeyStore()
    assert isinstance(store, KeyStore)
    assert (store.kind, store.hardware_backed) == ("software", False)
    blob = store.generate(algorithm)
    assert blob.startswith(b"-----BEGIN PRIVATE KEY-----")
    if not algorithm.is_rsa:
        with store.signer(blob) as key:
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            signature = key.sign(b"m", ec.ECDSA(hashes.SHA256()))
        public = store.public_key(blob)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, b"m", ec.ECDSA(hashes.SHA256()))


def test_software_key_garbage() -> None:
    with pytest.raises(KeyStoreError, match="not a usable PEM private key"):
        SoftwareKeyStore().public_key(b"garbage")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_atomic_write_is_private_and_replaces(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        directory = ensure_private_dir(tmp_path / "state" / "identity")
        target = directory / "key.pem"
        atomic_write(target, b"one")
        atomic_write(target, b"two")
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"two"
    assert mode(target) == 0o600
    assert mode(directory) == 0o700
    assert sorted(p.name for p in directory.iterdir()) == ["key.pem"]  # no temp left behind


def test_private_dir_is_tightened(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    ensure_private_dir(loose)
    assert mode(loose) == 0o700


def test_atomic_symlink_swaps(tmp_path: Path) -> None:
    (tmp_path / "gen-1").mkdir()
    (tmp_path / "gen-2").mkdir()
    link = tmp_path / "current"
    atomic_symlink("gen-1", link)
    atomic_symlink("gen-2", link)
    assert os.readlink(link) == "gen-2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "gen-1", "gen-2"]


def test_write_failure_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    atomic_write(target, b"old")
    os.chmod(tmp_path, 0o500)
    try:
        if os.access(tmp_path, os.W_OK):  # root ignores directory modes: use a missing parent
            target = tmp_path / "missing" / "f"
        with pytest.raises(StorageError, match="cannot write"):
            atomic_write(target, b"new")
    finally:
        os.chmod(tmp_path, 0o700)
    assert (tmp_path / "f").read_bytes() == b"old"


def test_read_bytes_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"x" * 11)
    assert read_bytes(path, limit=11) == b"x" * 11
    with pytest.raises(StorageError, match="larger than 10 bytes"):
        read_bytes(path, limit=10)
    with pytest.raises(StorageError, match="cannot read"):
        read_bytes(tmp_path / "none")
