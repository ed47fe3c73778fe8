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


def test_concurrent_writers_in_one_process_do_not_collide(tmp_path: Path) -> None:
    """Threads share a PID: a temp name made only of the PID was shared by all of them (one
    thread's rename took another's half-written temp file, or its own rename failed)."""
    import threading

    target = tmp_path / "state.json"
    errors: list[BaseException] = []
    payloads = [bytes([65 + n]) * 65536 for n in range(8)]

    def writer(payload: bytes) -> None:
        try:
            for _ in range(25):
                atomic_write(target, payload)
        except BaseException as e:  # collected, asserted below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_bytes() in payloads  # whole, never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_planted_links_at_the_temp_name_are_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "key.pem"
    # Whatever was predictable about the temp name, plant a symlink and a hard link there.
    os.symlink(victim, tmp_path / f".key.pem.tmp-{os.getpid()}")
    os.link(victim, tmp_path / f".current.tmp-{os.getpid()}")
    atomic_write(target, b"new key")
    atomic_symlink("gen-1", tmp_path / "current")
    assert victim.read_bytes() == b"precious"
    assert target.read_bytes() == b"new key" and not target.is_symlink()
    assert os.readlink(tmp_path / "current") == "gen-1"


def test_temp_file_is_created_exclusively(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the fresh name exists anyway, fail; never open (and truncate) someone else's file."""
    import hal.storage

    monkeypatch.setattr(hal.storage, "token", lambda: "fixed")
    planted = tmp_path / f".f.tmp-{os.getpid()}-fixed"
    planted.write_bytes(b"not ours")
    with pytest.raises(StorageError, match=r"cannot write .*: File exists"):
        atomic_write(tmp_path / "f", b"data")
    assert planted.read_bytes() == b"not ours"  # neither truncated nor deleted


def test_private_dir_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
        owner = 65534
    else:  # an unprivileged run: a root-owned directory is someone else's
        foreign, owner = Path("/"), 0
    with pytest.raises(StorageError, match=rf"belongs to uid {owner}, not to this process's user"):
        ensure_private_dir(foreign)


def test_rsa_software_keys_sign() -> None:
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    store = SoftwareKeyStore()
    blob = store.generate(KeyAlgorithm.RSA_2048)
    with store.signer(blob) as key:
        assert isinstance(key, rsa.RSAPrivateKey)
        signature = key.sign(b"m", padding.PKCS1v15(), hashes.SHA256())
    public = store.public_key(blob)
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048
    public.verify(signature, b"m", padding.PKCS1v15(), hashes.SHA256())


def test_read_bytes_does_not_allocate_its_limit(tmp_path: Path) -> None:
    """f.read(limit + 1) allocated the whole limit up front: MemoryError for a 4 EiB limit."""
    path = tmp_path / "small"
    path.write_bytes(b"abc")
    assert read_bytes(path, limit=2**62) == b"abc"
    big = tmp_path / "big"
    big.write_bytes(b"y" * (3 * 1024 * 1024 + 5))
    assert read_bytes(big, limit=3 * 1024 * 1024 + 5) == b"y" * (3 * 1024 * 1024 + 5)
    with pytest.raises(StorageError, match="larger than 3145732 bytes"):
        read_bytes(big, limit=3 * 1024 * 1024 + 4)
