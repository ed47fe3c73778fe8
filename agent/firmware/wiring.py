"""Build a FirmwareDevice from the config: the one place firmware implementations are chosen."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from agent.clock import Clock, SystemClock
from agent.config import BootloaderKind, Config, CounterKind
from agent.errors import ConfigError, StorageError
from agent.firmware.device import FirmwareDevice
from agent.firmware.root_paths import check_root_paths
from agent.firmware.status import FirmwareStatus
from hal.interfaces import BootControl, MonotonicCounter
from hal.secure_dir import DirStore

if TYPE_CHECKING:
    from agent.firmware.chain import TrustPolicy
from hal.slots import DeviceSlot, booted_slot
from hal.storage import read_bytes

SLOT_NAMES = ("A", "B")


def trust_policy(config: Config) -> TrustPolicy:
    # Imported here: only verify and install need X.509 (status, commit, rollback start faster).
    from agent.firmware.chain import TrustPolicy
    from agent.firmware.pem import load_certificates, load_crl

    fw = config.firmware
    return TrustPolicy(
        anchors=tuple(load_certificates(fw.trust_anchors)),
        crls=tuple(load_crl(path) for path in fw.crl_files),
        required_signers=fw.required_signers,
    )


def boot_control(config: Config) -> BootControl:
    fw = config.firmware
    if fw.bootloader is BootloaderKind.UBOOT:
        from hal.bootloader.uboot import UBootBootControl

        return UBootBootControl(
            config=fw.uboot_env_config,
            max_tries=fw.boot_tries,
            printenv=str(fw.fw_printenv),
            setenv=str(fw.fw_setenv),
        )
    if fw.bootloader is BootloaderKind.GRUB:
        from hal.bootloader.grub import GrubBootControl

        return GrubBootControl(env_file=fw.grub_env, editenv=str(fw.grub_editenv))
    from hal.bootloader.file import FileBootControl

    return FileBootControl(path=fw.file_env, max_tries=fw.boot_tries)


def counter(config: Config) -> MonotonicCounter:
    fw = config.firmware
    if fw.counter is CounterKind.TPM:
        from hal.tpm_counter import TpmCounter

        auth = b""
        if fw.counter_owner_auth_file is not None:
            auth = read_bytes(fw.counter_owner_auth_file, limit=1024).rstrip(b"\n")
        return TpmCounter(
            tcti=config.tpm.tcti,
            index=fw.counter_nv_index,
            store=state_store(config),
            owner_auth=auth,
        )
    from hal.file_counter import FileCounter

    return FileCounter(store=state_store(config))


def state_store(config: Config) -> DirStore:
    """Root's firmware state directory (records, lock, counter files), reached safely."""
    return DirStore(config.firmware.state_dir)


def snapshot_store(config: Config) -> DirStore | None:
    """Where root leaves a world-readable copy of `firmware status` for the service."""
    path = config.firmware.status_snapshot
    return None if path is None else DirStore(path.parent, private=False)


MAX_SNAPSHOT_BYTES = 256 * 1024


def firmware_status(config: Config) -> FirmwareStatus:
    """As root, from root's own state; as anyone else (the service), from the snapshot root
    leaves after every firmware command: never from root's files, which it cannot vouch for."""
    if os.geteuid() == 0:
        return firmware_device(config).status()
    path = config.firmware.status_snapshot
    if path is None:
        raise StorageError(
            "firmware status needs root here: firmware.status_snapshot is off, so root leaves "
            "no copy for other users"
        )
    data = DirStore(path.parent, private=False).read(path.name, limit=MAX_SNAPSHOT_BYTES)
    if data is None:
        raise StorageError(
            f"no firmware status snapshot at {path} yet: root writes it at its next firmware "
            "install, commit (every boot, by the mark-good service) or rollback"
        )
    try:
        table = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise StorageError(f"firmware status snapshot {path} is not JSON: {e}") from e
    return FirmwareStatus.from_dict(table, where=str(path))


def firmware_device(config: Config, *, clock: Clock | None = None) -> FirmwareDevice:
    fw = config.firmware
    if not fw.compatible:
        raise ConfigError(f"{config.source}: firmware.compatible: not set (firmware is off)")
    check_root_paths(config)
    slots = {
        "A": DeviceSlot(name="A", path=fw.slot_a),
        "B": DeviceSlot(name="B", path=fw.slot_b),
    }
    cmdline: Path = fw.cmdline
    return FirmwareDevice(
        boot=boot_control(config),
        slots=slots,
        counter=counter(config),
        store=state_store(config),
        snapshot=snapshot_store(config),
        booted_slot=lambda: booted_slot(cmdline, fw.cmdline_key),
        clock=clock or SystemClock(),
        compatible=fw.compatible,
        trust=lambda: trust_policy(config),
        boot_tries=fw.boot_tries,
        check_slot_at_commit=fw.check_slot_at_commit,
        buffer_bytes=fw.buffer_kib * 1024,
    )
