"""Helpers for enrollment tests, the bench and the demo: configs, password files, snapshots."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from agent.identity import LOCK_FILE_NAME
from tests.support.est_server import EstServer


def password_file(directory: Path, password: str = "enroll-secret", mode: int = 0o600) -> Path:  # noqa: S107
    path = directory / "est-password"
    path.write_text(password + "\n")
    os.chmod(path, mode)
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_text(
    *,
    state_dir: Path,
    est: EstServer | None = None,
    device_id: str = "gw-0001",
    store: str = "tpm",
    tcti: str = "",
    provider: Path | None = None,
    **est_keys: Any,
) -> str:
    """A config for `est` (trusting its CA explicitly unless est_keys say otherwise)."""
    lines = [
        "[device]",
        f"id = {_toml(device_id)}",
        "[paths]",
        f"state_dir = {_toml(str(state_dir))}",
        "[keys]",
        f"store = {_toml(store)}",
    ]
    if tcti or provider:
        lines += ["[tpm]"]
        if tcti:
            lines.append(f"tcti = {_toml(tcti)}")
        if provider:
            lines.append(f"openssl_provider = {_toml(str(provider))}")
    keys: dict[str, Any] = {}
    if est is not None:
        keys = {"url": est.url, "trust_anchor": str(est.ca_file), "retry_after_min_seconds": 0}
    keys.update(est_keys)
    lines.append("[est]")
    lines += [f"{k} = {_toml(v)}" for k, v in keys.items() if v is not None]
    # no control socket: these devices run one command at a time (or a daemon beside other
    # tests', which must not share /run/devid-agent); tests/support/control.py serves one
    lines += ["[control]", "enabled = false"]
    return "\n".join(lines) + "\n"


def write_config(path: Path, **kwargs: Any) -> Path:
    path.write_text(config_text(**kwargs))
    return path


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under `root` with its mode and bytes (a symlink: its target), except the
    enrollment lock file, which any run may create: checked here to be empty and 0600, and the
    audit trail (`audit.jsonl*`, `audit.lock`), which records every attempt, refused ones too."""
    result: dict[str, tuple[int, bytes]] = {}
    if not root.exists():
        return result
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                data = os.readlink(path).encode()
            elif stat.S_ISDIR(info.st_mode):
                data = b""
            else:
                data = path.read_bytes()
            result[str(path.relative_to(root))] = (info.st_mode, data)
    for name in [n for n in result if n.startswith("audit.")]:  # the record of the attempt
        del result[name]
    lock = result.pop(LOCK_FILE_NAME, None)
    assert lock in (None, (stat.S_IFREG | 0o600, b"")), f"{LOCK_FILE_NAME}: {lock}"
    return result
