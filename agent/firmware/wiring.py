"""Build a FirmwareDevice from the config: the one place firmware implementations are chosen."""

from __future__ import annotations

import os
from pathlib import Path

from agent.clock import Clock, SystemClock
from agent.config import BootloaderKind, Config, CounterKind
from agent.errors import ConfigError
from agent.firmware.chain import TrustPolicy
from agent.firmware.device import FirmwareDevice
from agent.firmware.pem import load_certificates, load_crl
from hal.interfaces import BootControl, MonotonicCounter
from hal.secure_dir import DirStore, untrusted_ancestor
from hal.slots import DeviceSlot, booted_slot
from hal.storage import read_bytes

SLOT_NAMES = ("A", "B")


def trust_policy(config: Config) -> TrustPolicy:
    fw = config.firmware
    return TrustPolicy(
        anchors=tuple(load_certificates(fw.trust_anchors)),
        crls=tuple(load_crl(path) for path in fw.crl_files),
    )


def boot_control(config: Config) -> BootControl:
    fw = config.firmware
    if fw.bootloader is BootloaderKind.UBOOT:
        from hal.bootloader.uboot import UBootBootControl

        return UBootBootControl(config=fw.uboot_env_config, max_tries=fw.boot_tries)
    if fw.bootloader is BootloaderKind.GRUB:
        from hal.bootloader.grub import GrubBootControl

        return GrubBootControl(env_file=fw.grub_env)
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


def root_used_paths(config: Config) -> list[tuple[str, Path]]:
    """Every file or directory root reads or writes for firmware, with its config key."""
    fw = config.firmware
    paths: list[tuple[str, Path | None]] = [
        ("firmware.state_dir", fw.state_dir),
        ("firmware.status_snapshot", fw.status_snapshot),
        ("firmware.trust_anchors", fw.trust_anchors),
        ("firmware.slot_a", Path(fw.slot_a)),
        ("firmware.slot_b", Path(fw.slot_b)),
        ("firmware.cmdline", fw.cmdline),
        ("firmware.counter_owner_auth_file", fw.counter_owner_auth_file),
        *(("firmware.crl_files", crl) for crl in fw.crl_files),
    ]
    if fw.bootloader is BootloaderKind.UBOOT:
        paths.append(("firmware.uboot_env_config", fw.uboot_env_config))
    elif fw.bootloader is BootloaderKind.GRUB:
        paths.append(("firmware.grub_env", fw.grub_env))
    else:
        paths.append(("firmware.file_env", fw.file_env))
    if config.source.is_absolute():
        paths.append(("the configuration file", config.source))
    return [(key, path) for key, path in paths if path is not None]


def check_root_paths(config: Config) -> None:
    """As root, refuse any firmware path that a user other than root could replace: the
    service user must not steer what root's OTA hooks read, write or trust."""
    if os.geteuid() != 0:
        return
    for key, path in root_used_paths(config):
        why = untrusted_ancestor(path)
        if why is not None:
            raise ConfigError(
                f"{config.source}: {key} = {str(path)!r}: {why}, so that user could replace it "
                "under root; use a path whose every directory belongs to root and is writable "
                "only by root"
            )


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
