"""Config: the example parses, every key is documented, and each kind of mistake gets one line
naming the file and the exact key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from agent.config import Config, KeyStoreKind, config_path, load_config, parse_config
from agent.errors import ConfigError
from hal.interfaces import KeyAlgorithm

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"
MINIMAL = '[device]\nid = "gw-7"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_example_config_parses_with_documented_defaults() -> None:
    config = load_config(EXAMPLE)
    defaults = parse_config(MINIMAL)
    assert config.device.id == "gw-0001"
    # The example shows every key at its default: apart from device.id it equals the defaults.
    assert dataclasses.replace(config, device=defaults.device, source=defaults.source) == defaults


def _keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = args[0] if typing.get_origin(tp) is not None and args else tp
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            keys += _keys(inner, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def test_example_documents_every_key() -> None:
    import tomllib

    table = tomllib.loads(EXAMPLE.read_text())
    missing = []
    for key in _keys(Config):
        node: typing.Any = table
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    assert missing == []


def test_minimal_config_defaults() -> None:
    config = parse_config(MINIMAL)
    assert config.keys.store is KeyStoreKind.TPM
    assert config.keys.algorithm is KeyAlgorithm.EC_P256
    assert config.tpm.tcti == "device:/dev/tpmrm0"
    assert config.tpm.openssl_provider is None
    assert config.tls.min_version == "1.2"
    assert config.paths.state_dir == Path("/var/lib/devid-agent")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "device.id: missing required key (a string)"),
        ('[device]\nid = ""\n', "device.id: expected a non-empty string, got ''"),
        ('[device]\nid = 7\n', "device.id: expected a string, got 7"),
        (MINIMAL + "[keys]\nalgoritm = 'ec-p256'\n", "keys.algoritm: unknown key (did you mean 'algorithm'?)"),
        (MINIMAL + "[keys]\nalgorithm = 'ec-p521'\n", "keys.algorithm: expected one of 'ec-p256', 'ec-p384', 'rsa-2048', 'rsa-3072', got 'ec-p521'"),
        (MINIMAL + "[keys]\nstore = 'hsm'\n", "keys.store: expected one of 'tpm', 'software', got 'hsm'"),
        (MINIMAL + "[tls]\nmin_version = '1.1'\n", "tls.min_version: expected '1.2' or '1.3', got '1.1'"),
        (MINIMAL + "[tpm]\nopenssl_provider = 'tpm2.so'\n", "tpm.openssl_provider: expected an absolute path, got 'tpm2.so'"),
        (MINIMAL + "[paths]\nstate_dir = 3\n", "paths.state_dir: expected a path string, got 3"),
        (MINIMAL + "[subject]\ncommon_name = 'yes'\n", "subject.common_name: expected true or false, got 'yes'"),
        (MINIMAL + "[subject]\nsan_uris = 'urn:x'\n", "subject.san_uris: expected a list of strings, got 'urn:x'"),
        (MINIMAL + "[subject]\nsan_dns = ['a', 2]\n", "subject.san_dns[1]: expected a string, got 2"),
        ("keys = 'tpm'\n" + MINIMAL, "keys: expected a table, got 'tpm'"),
        (MINIMAL + "[mqtt]\nhost = 'x'\n", "mqtt: unknown key"),
        (MINIMAL + "[logging]\nlevel = 'loud'\n", "logging.level: expected one of 'debug', 'info', 'warning', 'error', got 'loud'"),
    ],
)  # fmt: skip
def test_bad_values_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {message}"
    assert "\n" not in str(info.value)


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "[keys\n")
    with pytest.raises(ConfigError, match=r"config\.toml: invalid TOML: .*line 3") as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert (
        str(info.value)
        == f"{tmp_path / 'nope.toml'}: cannot read config file: No such file or directory"
    )


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'[device]\nid = "\xff"\n')
    with pytest.raises(ConfigError, match=r"config file is not UTF-8 \(byte 15\)"):
        load_config(path)


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEVID_AGENT_CONFIG", raising=False)
    assert config_path(None) == Path("/etc/devid-agent/config.toml")
    monkeypatch.setenv("DEVID_AGENT_CONFIG", "/tmp/env.toml")
    assert config_path(None) == Path("/tmp/env.toml")
    assert config_path("/tmp/arg.toml") == Path("/tmp/arg.toml")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=60, check=False,
    )  # fmt: skip


def test_cli_config_check_ok() -> None:
    result = run_cli("config", "check", "--config", str(EXAMPLE))
    assert (result.returncode, result.stdout, result.stderr) == (0, "OK\n", "")


def test_cli_config_check_bad_is_one_line_and_ex_config(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "[keys]\nalgorithm = 'dsa'\n")
    result = run_cli("--config", str(path), "config", "check")
    assert result.returncode == 78
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"devid-agent: {path}: keys.algorithm: expected one of 'ec-p256', 'ec-p384', "
        "'rsa-2048', 'rsa-3072', got 'dsa'"
    ]


def test_cli_config_from_environment(tmp_path: Path) -> None:
    import os

    path = write(tmp_path, "[device]\n")
    env = dict(os.environ, DEVID_AGENT_CONFIG=str(path))
    result = run_cli("config", "check", env=env)
    assert result.returncode == 78
    assert f"{path}: device.id: missing required key" in result.stderr


def test_cli_help_lists_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "config" in result.stdout
