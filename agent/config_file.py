"""Config file access: where the file is, and reading it safely.

Only a regular file is read, and opening never blocks: a FIFO (or a device) named as the config
is refused at once, not waited on (`O_NONBLOCK`, then `fstat` on the open descriptor, so what is
checked is what is read). At most `MAX_CONFIG_BYTES`; UTF-8.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agent.errors import ConfigError

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "MAX_CONFIG_BYTES",
    "config_path",
    "read_config_text",
]

DEFAULT_CONFIG_PATH = Path("/etc/devid-agent/config.toml")
CONFIG_ENV = "DEVID_AGENT_CONFIG"
MAX_CONFIG_BYTES = 1024 * 1024

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def read_config_text(path: Path) -> str:
    """The text of the regular file at `path`, or one-line ConfigError."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise ConfigError(f"{path}: the config must be a regular file, this is {kind}")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_CONFIG_BYTES:
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from e
    finally:
        os.close(fd)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: config file is not UTF-8 (byte {e.start})") from e


def config_path(explicit: str | None) -> Path:
    """--config, else $DEVID_AGENT_CONFIG, else /etc/devid-agent/config.toml."""
    if explicit is not None:
        if not explicit:
            raise ConfigError("--config: expected a config file path, got ''")
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH
