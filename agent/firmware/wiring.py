"""Build a FirmwareDevice from the config: the one place firmware implementations are chosen."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from agent.clock import Clock, SystemClock
from agent.config import BootloaderKind, Config, CounterKind
from agent.errors import ConfigError
from agent.firmware.device import FirmwareDevice
from hal.interfaces import BootControl, MonotonicCounter

if TYPE_CHECKING:
    from agent.firmware.chain import TrustPolicy
from hal.slots import DeviceSlot, booted_slot
from hal.storage import read_bytes

SLOT_NAMES = ("A", "B")
TPM_BASELINE_FILE = "tpm-counter-baseline.json"
FILE_COUNTER_FILE = "security-version"


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
            baseline_path=fw.state_dir / TPM_BASELINE_FILE,
            owner_auth=auth,
        )
    from hal.file_counter import FileCounter

    return FileCounter(path=fw.state_dir / FILE_COUNTER_FILE)


def firmware_device(config: Config, *, clock: Clock | None = None) -> FirmwareDevice:
    fw = config.firmware
    if not fw.compatible:
        raise ConfigError(f"{config.source}: firmware.compatible: not set (firmware is off)")
    slots = {
        "A": DeviceSlot(name="A", path=fw.slot_a),
        "B": DeviceSlot(name="B", path=fw.slot_b),
    }
    cmdline: Path = fw.cmdline
    return FirmwareDevice(
        boot=boot_control(config),
        slots=slots,
        counter=counter(config),
        state_dir=fw.state_dir,
        booted_slot=lambda: booted_slot(cmdline, fw.cmdline_key),
        clock=clock or SystemClock(),
        compatible=fw.compatible,
        trust=lambda: trust_policy(config),
        boot_tries=fw.boot_tries,
        check_slot_at_commit=fw.check_slot_at_commit,
        buffer_bytes=fw.buffer_kib * 1024,
    )
