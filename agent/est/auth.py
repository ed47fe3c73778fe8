"""HTTP Basic credentials for EST, read from a file only the agent can read."""

from __future__ import annotations

import base64
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import ConfigError

MAX_PASSWORD_BYTES = 4096


@dataclass(frozen=True)
class BasicCredentials:
    username: str
    password: str = field(repr=False)  # never in a repr, a log line or an error

    def header(self) -> str:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        return f"Basic {token}"


def load_basic_credentials(username: str, password_file: Path | None) -> BasicCredentials | None:
    """Credentials from config, or None when Basic is not configured.

    The password file must be a regular file that neither group nor others can read or write:
    a password anyone on the device can read authenticates anyone.
    """
    if not username and password_file is None:
        return None
    if not username or password_file is None:
        raise ConfigError("est: username and password_file must be set together")
    try:
        fd = os.open(password_file, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise ConfigError(f"est.password_file {password_file}: cannot open: {e.strerror}") from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"est.password_file {password_file}: not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(
                f"est.password_file {password_file}: mode {stat.S_IMODE(info.st_mode):04o} lets "
                "group or others access it; chmod 600 (or 400) it"
            )
        raw = os.read(fd, MAX_PASSWORD_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_PASSWORD_BYTES:
        raise ConfigError(f"est.password_file {password_file}: larger than {MAX_PASSWORD_BYTES} B")
    try:
        password = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise ConfigError(f"est.password_file {password_file}: not UTF-8") from e
    if not password:
        raise ConfigError(f"est.password_file {password_file}: empty")
    if ":" in username:
        raise ConfigError("est.username: must not contain ':' (HTTP Basic, RFC 7617)")
    return BasicCredentials(username=username, password=password)
