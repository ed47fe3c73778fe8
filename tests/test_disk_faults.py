"""Disk faults in every atomic write path: ENOSPC, EIO and EROFS on write, fsync, rename and the
directory fsync (issue 13).

The fault is injected at the edge, in the module under test only: that module's `os` is
replaced (pytest-mock) by a view of the real one whose `write`, `fsync`, `replace` or `symlink`
fails at its N-th call. Every N is tried, from the first call until the operation completes
without reaching the fault, so each write, each fsync (the file's and the directory's) and
each rename of the operation fails once. After each fault:

- the error is a StorageError with one line naming the errno's text;
- no temp file is left beside the target;
- the previous file is intact byte for byte (after a failed directory fsync the rename has
  happened: the file is then the new one, whole; the fault could not undo it);
- the next run, without the fault, succeeds and the new bytes are read back.

Paths: hal.storage.atomic_write / atomic_symlink (identity generations and `current`, the CA
certificates, the EST pending request) and hal.secure_dir.SecureDir.write (firmware records,
the counter file, the status snapshot, the scheduler state).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pytest_mock import MockerFixture

import hal.secure_dir
import hal.storage
from agent.est.pending import PendingRequest, PendingStore
from agent.firmware import state as firmware_state
from agent.firmware.status import FirmwareStatus, SlotStatus
from agent.identity import IdentityStore
from agent.renewal import History
from agent.renewal_state import STATE_FILE, SchedulerState, SchedulerStateStore
from hal.disk import FileStorage, FlockLock
from hal.errors import StorageError
from hal.file_counter import FileCounter
from hal.secure_dir import DirStore
from tests.support.ca import TestCA

ERRNOS = [errno.ENOSPC, errno.EIO, errno.EROFS]
#: the calls a write path makes that the disk can fail
CALLS = ["write", "fsync", "replace"]
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


class FaultyOs:
    """The real `os` for one module, except that the `nth` call of `name` fails with `err`.
    Records the order of the disk calls, so a test knows whether the rename had happened."""

    _DISK = ("write", "fsync", "replace", "rename", "symlink")

    def __init__(self, name: str, nth: int, err: int) -> None:
        self._name, self._nth, self._err = name, nth, err
        self.counts: dict[str, int] = {}
        self.log: list[str] = []
        self.fired = False

    def __getattr__(self, attr: str) -> Any:
        real = getattr(os, attr)
        if attr not in self._DISK:
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            n = self.counts[attr] = self.counts.get(attr, 0) + 1
            if attr == self._name and n == self._nth:
                self.fired = True
                self.log.append(f"{attr} FAILED")
                raise OSError(self._err, os.strerror(self._err))
            result = real(*args, **kwargs)
            self.log.append(attr)
            return result

        return call

    @property
    def renamed_before_fault(self) -> bool:
        return "replace" in self.log[: self.log.index(f"{self._name} FAILED")]


def faults(mocker: MockerFixture, module: ModuleType, name: str, err: int) -> Iterator[FaultyOs]:
    """A fresh FaultyOs patched into `module` for N = 1, 2, ...; the caller stops the loop when
    its operation completes without reaching the fault."""
    nth = 0
    while True:
        nth += 1
        fake = FaultyOs(name, nth, err)
        patch = mocker.patch.object(module, "os", fake)
        try:
            yield fake
        finally:
            mocker.stop(patch)
        if nth > 50:
            raise AssertionError(f"{name} never stopped failing")


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def check_error(e: StorageError, err: int) -> None:
    message = str(e)
    assert "\n" not in message
    assert os.strerror(err) in message, message


def sweep(
    mocker: MockerFixture,
    module: ModuleType,
    name: str,
    err: int,
    *,
    root: Path,
    write: Callable[[], None],
    read: Callable[[], bytes | None],
    old: bytes | None,
    new: bytes,
) -> int:
    """Fail the N-th `name` call of `write` for every N; check the promises; return how many
    distinct faults were injected."""
    injected = 0
    for fake in faults(mocker, module, name, err):
        try:
            write()
        except StorageError as e:
            assert fake.fired, f"{e} without a fault"
            injected += 1
            check_error(e, err)
            assert temp_files(root) == [], fake.log
            expected = new if fake.renamed_before_fault else old
            assert read() == expected, (name, fake.log)
            continue
        assert not fake.fired, f"fault at {name} swallowed: {fake.log}"
        break
    # the next run, with a healthy disk, recovers
    write()
    assert read() == new
    assert temp_files(root) == []
    return injected


# -- hal.storage: identity files, the CA certificates, the pending request ----------------------


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("name", CALLS)
def test_atomic_write(mocker: MockerFixture, tmp_path: Path, name: str, err: int) -> None:
    path = tmp_path / "cacerts.pem"
    hal.storage.atomic_write(path, b"old bytes\n")
    injected = sweep(
        mocker,
        hal.storage,
        name,
        err,
        root=tmp_path,
        write=lambda: hal.storage.atomic_write(path, b"new bytes, longer than the old\n"),
        read=path.read_bytes,
        old=b"old bytes\n",
        new=b"new bytes, longer than the old\n",
    )
    # write: one call; fsync: the file's and the directory's; replace: one
    assert injected == {"write": 1, "fsync": 2, "replace": 1}[name]


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("name", ["symlink", "replace", "fsync"])
def test_atomic_symlink(mocker: MockerFixture, tmp_path: Path, name: str, err: int) -> None:
    link = tmp_path / "current"
    hal.storage.atomic_symlink("gen-1", link)
    injected = sweep(
        mocker,
        hal.storage,
        name,
        err,
        root=tmp_path,
        write=lambda: hal.storage.atomic_symlink("gen-2", link),
        read=lambda: os.readlink(link).encode(),
        old=b"gen-1",
        new=b"gen-2",
    )
    assert injected == 1


def _install(store: IdentityStore, ca: TestCA) -> tuple[int, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(key.public_key(), subject="gw-1")
    identity = store.install(
        key_blob=b"KEY",
        key_file_name="key.pem",
        certificate=cert,
        chain=[ca.cert],
        ca_certs=[ca.cert],
    )
    return identity.generation, identity.cert_file.read_bytes()


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("name", [*CALLS, "symlink"])
def test_identity_generation_and_current(
    mocker: MockerFixture, tmp_path: Path, test_ca: TestCA, name: str, err: int
) -> None:
    store = IdentityStore(storage=FileStorage(), lock=FlockLock(), state_dir=tmp_path)
    first, _ = _install(store, test_ca)
    gen1 = _snapshot(store.root / f"gen-{first}")
    injected = 0
    for fake in faults(mocker, hal.storage, name, err):
        before = store.current_generation()
        try:
            _install(store, test_ca)
        except StorageError as e:
            injected += 1
            check_error(e, err)
            assert temp_files(tmp_path) == [], fake.log
            # the first generation is untouched, and `current` names a complete generation:
            # the one it named before unless the swap itself had been made
            assert _snapshot(store.root / f"gen-{first}") == gen1
            current = store.current()
            assert current is not None
            assert current.generation in (before, max(store.generations()))
            continue
        assert not fake.fired, fake.log
        break
    assert injected >= 1
    generation, cert = _install(store, test_ca)  # the next run recovers
    assert store.current_generation() == generation
    assert (store.current_link / "cert.pem").read_bytes() == cert
    assert temp_files(tmp_path) == []


def _pending(attempts: int) -> PendingRequest:
    return PendingRequest(
        operation="simpleenroll",
        key_store="software",
        key_blob=b"KEY",
        reused_key=False,
        csr_der=b"\x30\x00",
        proof_of_possession=False,
        created=NOW,
        retry_at=NOW + timedelta(minutes=1),
        attempts=attempts,
    )


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("name", CALLS)
def test_pending_request(mocker: MockerFixture, tmp_path: Path, name: str, err: int) -> None:
    store = PendingStore(path=tmp_path / "state" / "est-pending.json")
    store.save(_pending(1))
    sweep(
        mocker,
        hal.storage,
        name,
        err,
        root=tmp_path,
        write=lambda: store.save(_pending(2)),
        read=store.path.read_bytes,
        old=_pending(1).to_json(),
        new=_pending(2).to_json(),
    )
    loaded = store.load()
    assert loaded is not None and loaded.attempts == 2


# -- hal.secure_dir: firmware records, the counter file, the snapshot, the scheduler state ------


def _dir_sweep(
    mocker: MockerFixture,
    tmp_path: Path,
    name: str,
    err: int,
    *,
    store: DirStore,
    file: str,
    write_old: Callable[[], None],
    write_new: Callable[[], None],
) -> None:
    write_old()
    old = store.read(file, limit=1 << 20)
    assert old is not None
    before = (tmp_path / "store" / file).read_bytes()
    write_new()
    new = store.read(file, limit=1 << 20)
    assert new is not None and new != old
    hal.storage.atomic_write(tmp_path / "store" / file, before)  # back to the old bytes
    injected = sweep(
        mocker,
        hal.secure_dir,
        name,
        err,
        root=tmp_path,
        write=write_new,
        read=lambda: store.read(file, limit=1 << 20),
        old=old,
        new=new,
    )
    assert injected == {"write": 1, "fsync": 2, "replace": 1}[name]


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("name", CALLS)
def test_firmware_records(mocker: MockerFixture, tmp_path: Path, name: str, err: int) -> None:
    store = DirStore(tmp_path / "store")
    good = firmware_state.SlotRecord(state="good", version="1.0")
    old = firmware_state.FirmwareState(slots={"A": good})
    new = old.with_slot(
        "B", firmware_state.SlotRecord(state="installed", version="2.0"), pending="B"
    )
    _dir_sweep(
        mocker,
        tmp_path,
        name,
        err,
        store=store,
        file="state.json",
        write_old=lambda: store.write("state.json", firmware_state.encode_state(old)),
        write_new=lambda: store.write("state.json", firmware_state.encode_state(new)),
    )
    data = store.read("state.json", limit=1 << 16)
    assert firmware_state.parse_state(data, store.path("state.json")) == new


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("name", CALLS)
def test_counter_file(mocker: MockerFixture, tmp_path: Path, name: str, err: int) -> None:
    store = DirStore(tmp_path / "store")
    counter = FileCounter(store=store)
    target = {"value": 3}

    def raise_new() -> None:
        counter.raise_to(target["value"])

    _dir_sweep(
        mocker,
        tmp_path,
        name,
        err,
        store=store,
        file="security-version",
        write_old=lambda: counter.raise_to(2),
        write_new=raise_new,
    )
    assert counter.read() == 3


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("name", CALLS)
def test_status_snapshot(mocker: MockerFixture, tmp_path: Path, name: str, err: int) -> None:
    store = DirStore(tmp_path / "store", private=False)
    slot = SlotStatus(
        name="A",
        path="/dev/slot-a",
        booted=True,
        state="good",
        bootable=True,
        version="1.0",
        security_version=1,
        tries_left=3,
        digest="",
    )
    old = FirmwareStatus(
        booted="A",
        next_boot="A",
        bootloader="file",
        slots=(slot,),
        committed_security_version=1,
        counter="file",
        counter_hardware_backed=False,
        pending=None,
        fell_back=False,
    )
    new = dataclasses.replace(old, committed_security_version=2)

    def write(status: FirmwareStatus) -> None:
        data = json.dumps(status.to_dict(), indent=2, sort_keys=True).encode() + b"\n"
        store.write("status.json", data, mode=0o644)

    _dir_sweep(
        mocker,
        tmp_path,
        name,
        err,
        store=store,
        file="status.json",
        write_old=lambda: write(old),
        write_new=lambda: write(new),
    )
    table = json.loads(store.read("status.json", limit=1 << 16) or b"")
    assert FirmwareStatus.from_dict(table, where="status.json") == new
    assert (tmp_path / "store" / "status.json").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("name", CALLS)
def test_scheduler_state(mocker: MockerFixture, tmp_path: Path, name: str, err: int) -> None:
    store = DirStore(tmp_path / "store")
    states = SchedulerStateStore(store=store)
    old = SchedulerState(history=History(failures=1, last_attempt=NOW))
    new = SchedulerState(history=History(failures=2, last_attempt=NOW + timedelta(minutes=1)))
    _dir_sweep(
        mocker,
        tmp_path,
        name,
        err,
        store=store,
        file=STATE_FILE,
        write_old=lambda: states.save(old, NOW),
        write_new=lambda: states.save(new, NOW + timedelta(minutes=1)),
    )
    assert states.load().history.failures == 2
