"""hal.secure_dir: the checked walk from `/` and the by-descriptor file operations inside.

Ownership cases need root (to chown to a second uid); CI runs as root, as does this machine.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import StorageError
from hal.secure_dir import DirStore, SecureDir, untrusted_ancestor
from hal.storage import ensure_private_dir, read_bytes

OTHER_UID = 4242

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_creates_private_dirs_exactly_whatever_the_umask(base: Path) -> None:
    old = os.umask(0)
    try:
        store = DirStore(base / "a" / "b" / "state")
        store.write("f.json", b"{}")
    finally:
        os.umask(old)
    assert mode(base / "a") == 0o755 and mode(base / "a" / "b") == 0o755
    assert mode(base / "a" / "b" / "state") == 0o700
    assert mode(base / "a" / "b" / "state" / "f.json") == 0o600
    assert store.read("f.json", limit=10) == b"{}"
    assert store.read("missing", limit=10) is None
    assert [p.name for p in (base / "a" / "b" / "state").iterdir()] == ["f.json"]  # no temp left


def test_a_missing_directory_reads_as_nothing_and_is_not_created(base: Path) -> None:
    assert DirStore(base / "nothing").read("state.json", limit=10) is None
    assert not (base / "nothing").exists()


def test_a_looser_private_dir_is_tightened_through_its_descriptor(base: Path) -> None:
    (base / "state").mkdir(mode=0o755)
    DirStore(base / "state").write("x", b"1")
    assert mode(base / "state") == 0o700


def test_a_symlink_as_the_directory_is_refused_and_its_target_untouched(base: Path) -> None:
    target = base / "elsewhere"
    target.mkdir(mode=0o1777)
    os.chmod(target, 0o1777)
    (base / "state").symlink_to(target)
    with pytest.raises(StorageError, match=r"is a symlink or not a directory; name the real path"):
        DirStore(base / "state").write("x", b"1")
    assert mode(target) == 0o1777 and list(target.iterdir()) == []
    with pytest.raises(StorageError, match="symlink"):
        ensure_private_dir(base / "state")
    assert mode(target) == 0o1777


def test_a_symlink_higher_up_is_refused(base: Path) -> None:
    (base / "real").mkdir()
    (base / "link").symlink_to(base / "real")
    with pytest.raises(StorageError, match="symlink"):
        DirStore(base / "link" / "state").write("x", b"1")
    assert list((base / "real").iterdir()) == []


def test_a_planted_symlink_or_fifo_inside_is_refused_not_followed(base: Path) -> None:
    store = DirStore(base / "state")
    store.write("keep", b"k")
    secret = base / "secret"
    secret.write_bytes(b"root's")
    (base / "state" / "state.json").symlink_to(secret)
    with pytest.raises(StorageError, match="is a symlink; refusing to follow it"):
        store.read("state.json", limit=100)
    with pytest.raises(StorageError, match="symlink"), store.lock("state.json"):
        pass
    os.mkfifo(base / "state" / "lock")
    refused = "lock is not a regular file; refusing to lock it"
    with pytest.raises(StorageError, match=refused), store.lock("lock"):
        pass
    os.mkfifo(base / "state" / "fifo")
    with pytest.raises(StorageError, match="fifo is not a regular file; refusing to read it"):
        store.read("fifo", limit=100)
    # a write replaces the planted link itself, never what it points to
    store.write("state.json", b"new")
    assert secret.read_bytes() == b"root's"
    assert not (base / "state" / "state.json").is_symlink()


def test_read_bytes_refuses_a_fifo_without_waiting(base: Path) -> None:
    os.mkfifo(base / "config.toml")
    with pytest.raises(StorageError, match="is not a regular file"):
        read_bytes(base / "config.toml")


def test_reads_are_bounded(base: Path) -> None:
    store = DirStore(base / "state")
    store.write("big", b"x" * 101)
    with pytest.raises(StorageError, match="larger than 100 bytes"):
        store.read("big", limit=100)


@needs_root
def test_an_ancestor_owned_by_another_user_is_refused(base: Path) -> None:
    svc = base / "svc"
    svc.mkdir(mode=0o700)
    os.chown(svc, OTHER_UID, OTHER_UID)
    with pytest.raises(StorageError, match=rf"its ancestor {svc} is owned by uid {OTHER_UID}"):
        DirStore(svc / "firmware").write("x", b"1")
    assert list(svc.iterdir()) == []  # nothing created inside another user's directory
    assert untrusted_ancestor(svc / "firmware" / "state.json") == f"{svc} is owned by uid 4242"


@needs_root
def test_a_group_writable_ancestor_is_refused_a_sticky_one_only_for_foreign_entries(
    base: Path,
) -> None:
    shared = base / "shared"
    shared.mkdir()
    os.chmod(shared, 0o775)
    with pytest.raises(StorageError, match="writable by group or others"):
        DirStore(shared / "fw").write("x", b"1")
    assert (
        untrusted_ancestor(shared / "fw") == f"{shared} is writable by group or others (mode 0775)"
    )
    os.chmod(shared, 0o1777)  # like /tmp: nobody may rename another's entry
    DirStore(shared / "fw").write("x", b"1")  # ours: fine
    assert untrusted_ancestor(shared / "fw" / "x") is None
    squatted = shared / "squatted"
    squatted.mkdir()
    os.chown(squatted, OTHER_UID, OTHER_UID)
    with pytest.raises(StorageError, match="writable by group or others"):
        DirStore(squatted).read("x", limit=10)


@needs_root
def test_the_last_directory_must_be_ours_or_for_shared_ones_roots(base: Path) -> None:
    theirs = base / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    with pytest.raises(StorageError, match=f"belongs to uid {OTHER_UID}"):
        DirStore(theirs).write("x", b"1")
    with pytest.raises(StorageError, match=f"belongs to uid {OTHER_UID}"):
        DirStore(theirs, private=False).read("x", limit=10)
    open_dir = base / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(StorageError, match="writable by group or others; want 0755"):
        DirStore(open_dir, private=False).read("x", limit=10)


def test_untrusted_ancestor_follows_symlinks_placed_by_root(base: Path) -> None:
    (base / "real").mkdir()
    (base / "real" / "grubenv").write_text("x")
    (base / "link").symlink_to(base / "real")
    assert untrusted_ancestor(base / "link" / "grubenv") is None
    assert untrusted_ancestor(Path("/proc/cmdline")) is None


def test_secure_dir_closes_its_descriptor(base: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        DirStore(base / "s").write("x", b"1")
        DirStore(base / "s").read("x", limit=10)
        with DirStore(base / "s").lock("lock"):
            pass
        with pytest.raises(StorageError):
            DirStore(base / "s" / "x").read("y", limit=1)  # x is a file, not a directory
    sd = SecureDir.open(base / "s")
    assert sd is not None
    sd.close()
    sd.close()  # idempotent
    assert len(os.listdir("/proc/self/fd")) == before
