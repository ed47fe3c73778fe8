"""`config check` refuses exactly what a command would refuse later: every cross-key rule and
every numeric bound lives in the config layer, and the file is read without ever blocking."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import MAX_CONFIG_BYTES, load_config, parse_config
from agent.config_file import read_config_text
from agent.errors import ConfigError
from tests.conftest import ROOT

BASE = '[device]\nid = "gw-7"\n[est]\nurl = "https://est.example:8443"\n'

# (extra TOML, the key the one line names, a fragment of what it says)
REFUSED = [
    (
        "retry_after_min_seconds = 600\nretry_after_max_seconds = 60\n",
        "est.retry_after_min_seconds",
        "exceeds est.retry_after_max_seconds",
    ),
    (
        'proof_of_possession = "always"\n[tls]\nmin_version = "1.3"\n',
        "est.proof_of_possession",
        "needs TLS 1.2",
    ),
    ('idevid_cert = "/etc/idevid.pem"\n', "est.idevid_key", "go together"),
    ('idevid_key = "/etc/idevid.tss2.pem"\n', "est.idevid_cert", "go together"),
    ('username = "device"\n', "est.password_file", "go together"),
    ('password_file = "/etc/devid-agent/pw"\n', "est.username", "go together"),
    ('username = "dev:ice"\npassword_file = "/etc/pw"\n', "est.username", "without ':'"),
    ("read_timeout_seconds = 1e308\n", "est.read_timeout_seconds", "at most 3600"),
    ("connect_timeout_seconds = 1e308\n", "est.connect_timeout_seconds", "at most 3600"),
    ("read_timeout_seconds = 0\n", "est.read_timeout_seconds", "greater than 0"),
    ("retry_after_max_seconds = 1e12\n", "est.retry_after_max_seconds", "at most 2.592e+06"),
    ("retry_after_min_seconds = 1e12\n", "est.retry_after_min_seconds", "from 0 to"),
    ("retry_after_default_seconds = 1e12\n", "est.retry_after_default_seconds", "from 0 to"),
    ("clock_skew_seconds = 1e308\n", "est.clock_skew_seconds", "from 0 to 86400"),
    ("max_response_bytes = 9223372036854775807\n", "est.max_response_bytes", "from 1 to"),
    ("generations_kept = 1000000\n", "est.generations_kept", "to 100"),
]


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(("extra", "key", "message"), REFUSED, ids=[r[1] for r in REFUSED])
def test_config_check_refuses_what_enroll_would(
    tmp_path: Path, extra: str, key: str, message: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(BASE + extra)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    line = str(info.value)
    assert line.startswith(f"{path}: {key}: ") and message in line, line
    check = run_cli("config", "check", "--config", str(path))
    assert check.returncode == 78 and check.stdout == ""
    assert check.stderr == f"devid-agent: {line}\n"
    enroll = run_cli("enroll", "--config", str(path))  # refused the same way, before any I/O
    assert (enroll.returncode, enroll.stderr) == (78, check.stderr)


def test_the_bounds_themselves_are_accepted() -> None:
    config = parse_config(
        BASE + "read_timeout_seconds = 3600\nconnect_timeout_seconds = 3600\n"
        "retry_after_min_seconds = 2592000\nretry_after_max_seconds = 2592000\n"
        "retry_after_default_seconds = 0\nclock_skew_seconds = 86400\ngenerations_kept = 100\n"
    )
    assert config.est.retry_after_max_seconds == 30 * 86400


def test_a_config_built_in_code_meets_the_same_rules(tmp_path: Path) -> None:
    """The rules run for a Config made without the loader too (what the daemon's tests do)."""
    import dataclasses

    from agent.config import check_cross_keys

    config = parse_config(BASE)
    bad = dataclasses.replace(
        config, est=dataclasses.replace(config.est, idevid_cert=Path("/etc/idevid.pem"))
    )
    with pytest.raises(ConfigError, match=r"est\.idevid_key: not set"):
        check_cross_keys(bad)


@pytest.mark.parametrize("kind", ["fifo", "directory", "chardev", "socket"])
def test_a_non_regular_config_is_refused_without_blocking(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "config.toml"
    if kind == "fifo":
        os.mkfifo(path)  # no writer: a plain open() would wait forever
        what = "a FIFO"
    elif kind == "directory":
        path.mkdir()
        what = "a directory"
    elif kind == "chardev":
        path = Path("/dev/null")
        what = "a character device"
    else:
        import socket

        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
        what = "a socket"
    with pytest.raises(ConfigError) as info:
        read_config_text(path)
    text = str(info.value)
    if kind == "socket":  # a Unix socket cannot be opened at all
        assert text.startswith(f"{path}: cannot read config file"), text
    else:
        assert text == f"{path}: the config must be a regular file, this is {what}"
    check = run_cli("config", "check", "--config", str(path), timeout=20)
    assert check.returncode == 78 and check.stderr == f"devid-agent: {text}\n"


def test_a_symlink_to_a_regular_file_is_read(tmp_path: Path) -> None:
    real = tmp_path / "real.toml"
    real.write_text(BASE)
    link = tmp_path / "config.toml"
    link.symlink_to(real)
    assert load_config(link).est.url == "https://est.example:8443"


def test_size_limit_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    body = BASE + "#" * (MAX_CONFIG_BYTES - len(BASE) - 1) + "\n"
    path.write_text(body)
    assert load_config(path).device.id == "gw-7"
    path.write_text(body + "#")
    with pytest.raises(ConfigError, match="larger than"):
        load_config(path)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("request_timeout_seconds = 0\n", "control.request_timeout_seconds: expected seconds"),
        ("max_clients = 0\n", "control.max_clients: expected an integer from 1 to 256"),
        ('readers_group = "a b"\n', "control.readers_group: expected a group name"),
        ('readers_group = "devid-no-such-group"\n', "there is no group 'devid-no-such-group'"),
    ],
)
def test_config_check_refuses_bad_control_settings(
    tmp_path: Path, extra: str, message: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(BASE + "[control]\n" + extra)
    check = run_cli("config", "check", "--config", str(path))
    assert check.returncode == 78 and message in check.stderr, check.stderr
    assert check.stderr.count("\n") == 1
