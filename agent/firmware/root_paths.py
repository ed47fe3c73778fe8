"""The paths root's firmware commands read, write or trust, and the rule they must meet.

Root runs the firmware commands from OTA hooks; the service runs as an unprivileged user. If
that user could write any directory above a path root uses, it could swap the file under root
(a planted state file, a symlinked counter, another trust anchor). So, as root, every such path
must have only root-owned, root-writable directories above it (hal.secure_dir's rule). Kept
light: `config check` runs it without importing the firmware verifier.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from agent.config import BootloaderKind, Config
from agent.errors import ConfigError


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
        ("firmware.crl_dir", fw.crl_dir),
        ("firmware.crl_issuers", fw.crl_issuers),
    ]
    if fw.download_ca not in ("", "system"):
        paths.append(("firmware.download_ca", Path(fw.download_ca)))
    if fw.bootloader is BootloaderKind.UBOOT:
        paths.append(("firmware.uboot_env_config", fw.uboot_env_config))
    elif fw.bootloader is BootloaderKind.GRUB:
        paths.append(("firmware.grub_env", fw.grub_env))
    else:
        paths.append(("firmware.file_env", fw.file_env))
    if config.source.is_absolute():
        paths.append(("the configuration file", config.source))
    return [(key, path) for key, path in paths if path is not None]


def check_root_paths(config: Config, why_untrusted: Callable[[Path], str | None]) -> None:
    """Refuse any firmware path that a user other than root could replace (`why_untrusted`
    says why, or None): the service user must not steer what root's OTA hooks read, write or
    trust. The caller runs it as root (agent.wiring)."""
    for key, path in root_used_paths(config):
        why = why_untrusted(path)
        if why is not None:
            raise ConfigError(
                f"{config.source}: {key} = {str(path)!r}: {why}, so that user could replace it "
                "under root; use a path whose every directory belongs to root and is writable "
                "only by root"
            )
