"""The device side: verify, install, commit, roll back, report. The edges (bootloader, slots,
counter, state file) come in by injection; the decisions are in verify.py.

Order of install, so that a rejection or a power cut loses nothing:
  1. read the booted slot, the bootloader env (a corrupt env stops us here), the committed
     security version; parse and verify header, signatures, chains, compatibility, anti-rollback;
  2. for a seekable bundle, hash the whole payload once before touching anything;
  3. mark the target slot bad in the bootloader (never fall back into a half-written slot) and
     "writing" in the state file;
  4. stream the payload into the slot with a bounded buffer while hashing; read it back and
     hash again;
  5. record it "installed", make it the next boot with `boot_tries` tries, record it pending.
The anti-rollback counter is raised only by `commit`, after the new slot booted and was marked
good, and only once the booted slot is found to hold the recorded image.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from agent.clock import Clock
from agent.errors import BootControlError, FirmwareVerificationError, RollbackError, StorageError
from agent.firmware.bundle import DEFAULT_LIMITS, BundleLimits, read_header
from agent.firmware.manifest import HASH_ALGORITHMS, Manifest
from agent.firmware.state import (
    MAX_STATE_BYTES,
    FirmwareState,
    SlotRecord,
    encode_state,
    parse_state,
)
from agent.firmware.status import STATE_FILE, FirmwareStatus, status_of
from agent.firmware.verify import DEFAULT_BUFFER_BYTES, DeviceFacts, stream_payload, verify_header
from hal.interfaces import BootControl, FileStore, MonotonicCounter, Slot

if TYPE_CHECKING:
    from agent.firmware.chain import TrustPolicy

log = logging.getLogger(__name__)

LOCK_FILE = "lock"
SNAPSHOT_FILE = "status.json"


@dataclass(frozen=True)
class CommitResult:
    slot: str
    security_version: int
    fell_back_from: str | None


def _same_storage(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    if sa.st_rdev and sa.st_rdev == sb.st_rdev:
        return True
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class FirmwareDevice:
    def __init__(
        self,
        *,
        boot: BootControl,
        slots: Mapping[str, Slot],
        counter: MonotonicCounter,
        store: FileStore,
        booted_slot: Callable[[], str],
        clock: Clock,
        compatible: str,
        trust: Callable[[], TrustPolicy],
        boot_tries: int = 3,
        check_slot_at_commit: bool = False,
        limits: BundleLimits = DEFAULT_LIMITS,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        snapshot: FileStore | None = None,
    ) -> None:
        self.boot = boot
        self.slots = dict(slots)
        self.counter = counter
        self.store = store
        #: written (0644) after every change, for readers that may not see root's state
        self.snapshot = snapshot
        self.booted_slot = booted_slot
        self.clock = clock
        self.compatible = compatible
        self.trust = trust
        self.boot_tries = boot_tries
        self.check_slot_at_commit = check_slot_at_commit
        self.limits = limits
        self.buffer_bytes = buffer_bytes

    # -- helpers ------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.store.path(STATE_FILE)

    def _load(self) -> FirmwareState:
        return parse_state(self.store.read(STATE_FILE, limit=MAX_STATE_BYTES), self.state_path)

    def _save(self, state: FirmwareState) -> None:
        self.store.write(STATE_FILE, encode_state(state))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One firmware operation at a time (hooks may overlap with the mark-good service);
        the status snapshot is refreshed when the operation ends, whichever way it ends."""
        with self.store.lock(LOCK_FILE):
            try:
                yield
            finally:
                self._write_snapshot()

    def _write_snapshot(self) -> None:
        if self.snapshot is None:
            return
        try:
            data = json.dumps(self.status().to_dict(), indent=2, sort_keys=True).encode() + b"\n"
            self.snapshot.write(SNAPSHOT_FILE, data, mode=0o644)
        except Exception as e:
            log.warning("firmware status snapshot not written: %s", e)

    def _booted(self) -> str:
        booted = self.booted_slot()
        if booted not in self.slots:
            raise BootControlError(
                f"booted slot {booted!r} is not a configured slot ({', '.join(self.slots)})"
            )
        return booted

    def _other(self, booted: str) -> str:
        others = [name for name in self.slots if name != booted]
        if len(others) != 1:
            raise BootControlError(f"expected exactly two slots, have {sorted(self.slots)}")
        return others[0]

    def _now_text(self) -> str:
        return self.clock.now().strftime("%Y-%m-%dT%H:%M:%SZ")

    def _record(self, manifest: Manifest, state: str) -> SlotRecord:
        return SlotRecord(
            state=state,
            version=manifest.version,
            security_version=manifest.security_version,
            hash_algorithm=manifest.hash_algorithm,
            digest=manifest.digest.hex(),
            size=manifest.payload_size,
            updated=self._now_text(),
        )

    def _verify_header(self, stream: BinaryIO) -> Manifest:
        header = read_header(stream, self.limits)
        facts = DeviceFacts(
            compatible=self.compatible, committed_security_version=self.counter.read()
        )
        manifest = verify_header(header, policy=self.trust(), device=facts, now=self.clock.now())
        # A download knows its length before the payload arrives (agent.firmware.fetch): one
        # that cannot be this payload is refused before any slot is touched.
        remaining = getattr(stream, "declared_remaining", None)
        if isinstance(remaining, int) and remaining != manifest.payload_size:
            raise FirmwareVerificationError(
                f"the download announces {remaining} payload bytes; the manifest states "
                f"{manifest.payload_size}"
            )
        return manifest

    # -- commands -----------------------------------------------------------------------------

    def verify(self, stream: BinaryIO) -> Manifest:
        """Verify a whole bundle without touching anything."""
        manifest = self._verify_header(stream)
        stream_payload(stream, manifest, buffer_bytes=self.buffer_bytes)
        return manifest

    def install(self, stream: BinaryIO, *, slot: str | None = None) -> tuple[str, Manifest]:
        with self._locked():
            return self._install(stream, slot)

    def _install(self, stream: BinaryIO, slot_name: str | None) -> tuple[str, Manifest]:
        booted = self._booted()
        target = slot_name or self._other(booted)
        if target not in self.slots:
            raise BootControlError(f"unknown slot {target!r} ({', '.join(self.slots)})")
        if target == booted or _same_storage(self.slots[target].path, self.slots[booted].path):
            raise BootControlError(
                f"refusing to write slot {target} ({self.slots[target].path}): it is the booted "
                f"slot {booted}"
            )
        mounted = self.slots[target].mounted_at()
        if mounted is not None:
            raise BootControlError(
                f"refusing to write slot {target} ({self.slots[target].path}): mounted at {mounted}"
            )
        self.boot.state()  # a corrupt bootloader env stops us before anything is written
        state = self._load()
        manifest = self._verify_header(stream)
        slot = self.slots[target]
        capacity = slot.capacity()
        if manifest.payload_size > capacity:
            raise FirmwareVerificationError(
                f"payload of {manifest.payload_size} bytes does not fit slot {target} "
                f"({capacity} bytes)"
            )
        if stream.seekable():
            start = stream.tell()
            stream_payload(stream, manifest, buffer_bytes=self.buffer_bytes)
            stream.seek(start)

        if state.pending is not None:  # superseded; cleared first so no cut looks like a fallback
            state = replace(state, pending=None)
            self._save(state)
        self.boot.mark_bad(target)
        state = state.with_slot(target, self._record(manifest, "writing"))
        self._save(state)
        log.info("writing %s (%s) into slot %s", manifest.version, slot.path, target)
        try:
            with slot.open_write() as out:

                def write_all(chunk: memoryview) -> None:
                    while chunk:
                        chunk = chunk[out.write(chunk) or 0 :]

                stream_payload(stream, manifest, sink=write_all, buffer_bytes=self.buffer_bytes)
            self._read_back(target, manifest)
        except Exception:
            with contextlib.suppress(Exception):
                self._save(state.with_slot(target, self._record(manifest, "failed")))
            raise
        # "installed" before the bootloader may boot it; "pending" only once it will: a cut
        # between the two must not look like a fallback.
        state = state.with_slot(target, self._record(manifest, "installed"), fell_back_from=None)
        self._save(state)
        self.boot.set_primary(target, tries=self.boot_tries)
        self._save(replace(state, pending=target))
        log.info("slot %s holds %s and boots next", target, manifest.version)
        return target, manifest

    def _holds(self, name: str, hash_algorithm: str, digest: bytes, size: int) -> bool:
        """Whether the first `size` bytes of slot `name` hash to `digest`."""
        hasher = hashlib.new(hash_algorithm)
        remaining = size
        with self.slots[name].open_read() as f:
            while remaining:
                chunk = f.read(min(remaining, self.buffer_bytes))
                if not chunk:
                    return False
                hasher.update(chunk)
                remaining -= len(chunk)
        return hmac.compare_digest(hasher.digest(), digest)

    def _read_back(self, target: str, manifest: Manifest) -> None:
        if not self._holds(target, manifest.hash_algorithm, manifest.digest, manifest.payload_size):
            raise StorageError(
                f"slot {target} ({self.slots[target].path}) reads back different bytes than "
                "were written"
            )

    def _require_recorded_image(self, name: str, record: SlotRecord) -> None:
        """Before the first commit of an install believes its record (and raises the counter
        to its security version), check that the slot holds the recorded bytes. Later commits
        of a `good` slot trust the record this check made good: no I/O on every boot."""
        try:
            digest = bytes.fromhex(record.digest)
            holds = record.hash_algorithm in HASH_ALGORITHMS and self._holds(
                name, record.hash_algorithm, digest, record.size
            )
        except ValueError:
            holds = False
        if not holds:
            raise FirmwareVerificationError(
                f"booted slot {name} ({self.slots[name].path}) does not hold the image recorded "
                f"for it ({record.version}, {record.state}); not committing it (a root "
                "filesystem mounted read-write changes the slot's bytes: then set "
                "firmware.check_slot_at_commit = false)"
            )

    def commit(self) -> CommitResult:
        """Mark the booted slot good, then raise the counter to its security version. Run on
        every good boot. If the bootloader fell back from a pending install, that slot is
        marked bad and failed."""
        with self._locked():
            booted = self._booted()
            boot_state = self.boot.state()
            state = self._load()
            self.counter.read()  # a counter we cannot trust stops us before anything changes
            pending = state.pending
            fell_back_from = None
            if pending is not None and pending != booted:
                if boot_state.bootable(pending):
                    log.info("slot %s is installed, not booted yet; committing %s", pending, booted)
                else:
                    fell_back_from = pending
                    log.warning("the bootloader fell back from slot %s to %s", pending, booted)
            record = state.slots.get(booted) or SlotRecord(state="good", updated=self._now_text())
            if record.state != "good" and self.check_slot_at_commit:
                self._require_recorded_image(booted, record)  # first commit: check the record
            self.boot.mark_good(booted)
            state = state.with_slot(booted, replace(record, state="good", updated=self._now_text()))
            if pending == booted:
                state = replace(state, pending=None)
            if fell_back_from is not None:
                self.boot.mark_bad(fell_back_from)
                failed = replace(state.slots[fell_back_from], state="failed")
                state = state.with_slot(
                    fell_back_from, failed, pending=None, fell_back_from=fell_back_from
                )
            self._save(state)
            committed = self.counter.raise_to(record.security_version)
            return CommitResult(
                slot=booted, security_version=committed, fell_back_from=fell_back_from
            )

    def rollback(self) -> str:
        """Make the other slot the next boot if it holds a committed image; if the other slot
        holds a pending install instead, cancel it (the booted slot stays the next boot)."""
        with self._locked():
            booted = self._booted()
            other = self._other(booted)
            boot_state = self.boot.state()
            state = self._load()
            if state.pending == other:
                # Not booted yet (or the bootloader already fell back): cancel the install.
                self.boot.mark_bad(other)
                self.boot.mark_good(booted)
                cancelled = replace(state.slots[other], state="failed", updated=self._now_text())
                self._save(state.with_slot(other, cancelled, pending=None))
                log.info("cancelled the pending install in slot %s", other)
                return booted
            if state.pending == booted:
                # Booted into an install not committed yet (Mender's ArtifactRollback after its
                # reboot): go back to the slot that ran before it, whatever our record of it (a
                # factory image has none); the counter was not raised for the new one.
                if not boot_state.bootable(other):
                    raise BootControlError(
                        f"slot {other} is marked bad in the bootloader ({self.boot.kind}); "
                        "not rolling back to it"
                    )
                previous = state.slots.get(other)
                committed = self.counter.read()
                if previous is not None and previous.security_version < committed:
                    raise RollbackError(
                        f"slot {other} has security_version {previous.security_version}, below "
                        f"the committed {committed}: rollback refused"
                    )
                self.boot.mark_bad(booted)
                self.boot.set_primary(other, tries=self.boot_tries)
                failed = replace(state.slots[booted], state="failed", updated=self._now_text())
                self._save(state.with_slot(booted, failed, pending=None))
                log.info("rolled back the uncommitted install in slot %s to slot %s", booted, other)
                return other
            record = state.slots.get(other)
            if record is None or record.state != "good":
                what = "no record" if record is None else f"state {record.state!r}"
                raise BootControlError(
                    f"slot {other} holds no committed image ({what}); nothing to roll back to"
                )
            if not boot_state.bootable(other):
                # The bootloader's verdict wins over our record: RAUC's `mark-bad` (or the
                # bootloader) took it out of the order or used up its tries.
                raise BootControlError(
                    f"slot {other} is marked bad in the bootloader ({self.boot.kind}: not in "
                    "the boot order, or no tries left); not rolling back to it"
                )
            committed = self.counter.read()
            if record.security_version < committed:
                raise RollbackError(
                    f"slot {other} has security_version {record.security_version}, below the "
                    f"committed {committed}: rollback refused"
                )
            self.boot.set_primary(other, tries=self.boot_tries)
            self._save(FirmwareState(slots=state.slots, pending=None))
            return other

    def status(self) -> FirmwareStatus:
        booted = self._booted()
        return status_of(
            booted=booted,
            boot_state=self.boot.state(),
            bootloader=self.boot.kind,
            state=self._load(),
            slot_paths={name: slot.path for name, slot in self.slots.items()},
            counter=self.counter,
        )
