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
    from agent.config import tomllib  # tomli on Python 3.10

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
        (MINIMAL + "[mqtt]\nhost = 'x'\n", "mqtt.host: unknown key"),
        (MINIMAL + "[logging]\nlevel = 'loud'\n", "logging.level: expected one of 'debug', 'info', 'warning', 'error', got 'loud'"),
        # Review: edge cases that escaped as tracebacks, were accepted, or gave an unclear line.
        (MINIMAL + "[est]\nconnect_timeout_seconds = " + "9" * 400 + "\n", "est.connect_timeout_seconds: expected a number that fits in 64 bits (TOML's range), got an integer of 400 digits"),
        (MINIMAL + "[est]\nmax_response_bytes = " + "9" * 30 + "\n", "est.max_response_bytes: expected an integer that fits in 64 bits (TOML's range), got " + "9" * 30),
        (MINIMAL + "[est]\nread_timeout_seconds = inf\n", "est.read_timeout_seconds: expected a finite number, got inf"),
        (MINIMAL + "[est]\nretry_after_max_seconds = inf\n", "est.retry_after_max_seconds: expected a finite number, got inf"),
        (MINIMAL + "[est]\nclock_skew_seconds = nan\n", "est.clock_skew_seconds: expected a finite number, got nan"),
        (MINIMAL + "[est]\ngenerations_kept = 3.0\n", "est.generations_kept: expected an integer, got 3.0"),
        (MINIMAL + "[est]\nuse_csrattrs = 1\n", "est.use_csrattrs: expected true or false, got 1"),
        (MINIMAL + "[est]\ngenerations_kept = true\n", "est.generations_kept: expected an integer, got True"),
        (MINIMAL + '[tpm]\nopenssl_provider = "/usr/lib/tpm2\\u0000.so"\n', "tpm.openssl_provider: expected a path without control characters, got '/usr/lib/tpm2\\x00.so'"),
        (MINIMAL + "[firmware]\ncrl_files = ['crl.pem']\n", "firmware.crl_files[0]: expected an absolute path, got 'crl.pem'"),
        (MINIMAL + '[keys]\n"bad\\nkey" = 1\n', 'keys."bad\\nkey": unknown key'),
        (MINIMAL + "[keys]\nstore = 'TPM'\n", "keys.store: expected one of 'tpm', 'software', got 'TPM' (values are case-sensitive: did you mean 'tpm'?)"),
        (MINIMAL + "[tpm]\ntcti = 1979-05-27T07:32:00Z\n", "tpm.tcti: expected a string, got a TOML date/time (1979-05-27T07:32:00+00:00)"),
        (MINIMAL + "[tpm]\ntcti = {device = '/dev/tpmrm0'}\n", "tpm.tcti: expected a string, got a table"),
        (MINIMAL + "[device.extra]\nx = 1\n", "device.extra: unknown key"),
        ("[[device]]\nid = 'gw'\n", "device: expected a table, got a list"),
        (MINIMAL + "[[subject.san_dns]]\nname = 'x'\n", "subject.san_dns[0]: expected a string, got a table"),
        ('[device]\nid = "gw\\n7"\n', "device.id: expected a string without control characters, got 'gw\\n7'"),
        ('[device]\nid = "' + "x" * 65 + '"\n', "device.id: expected at most 64 characters (the X.509 limit for commonName and serialNumber), got 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx..."),
        (MINIMAL + '[est]\nurl = "https://est.example\\r\\n/x"\n', "est.url: expected a string without control characters, got 'https://est.example\\r\\n/x'"),
        (MINIMAL + "[subject]\norganization = '" + "o" * 65 + "'\n", "subject.organization: expected at most 64 characters (the X.509 limit for this attribute), got '" + "o" * 56 + "..."),
        (MINIMAL + "[subject]\nsan_dns = ['ok.example', 'b\u00fccher.example']\n", "subject.san_dns[1]: expected an ASCII DNS name (A-label; IDNs must be punycode), got 'b\u00fccher.example'"),
        (MINIMAL + "[subject]\nsan_uris = ['device 7']\n", "subject.san_uris[0]: expected an ASCII URI with a scheme, e.g. \"urn:example:device:{device_id}\", got 'device 7'"),
        ("[device]\nid = 'gw-\u00e9'\n[subject]\nsan_dns = ['{device_id}.example']\n", "subject.san_dns[0]: with device.id 'gw-\u00e9' this becomes 'gw-\u00e9.example', not an ASCII DNS name (A-label; IDNs must be punycode)"),
        ("[device]\nid = 'gw 7'\n[subject]\nsan_uris = ['urn:x:{device_id}']\n", "subject.san_uris[0]: with device.id 'gw 7' this becomes 'urn:x:gw 7', not an ASCII URI with a scheme, e.g. \"urn:example:device:{device_id}\""),
        (MINIMAL + "[subject]\nsan_dns = ['{devid}.example']\n", "subject.san_dns[0]: expected an ASCII DNS name (A-label; IDNs must be punycode), got '{devid}.example'"),
        (MINIMAL + "[est]\ncacerts_refresh_seconds = 0.5\n", "est.cacerts_refresh_seconds: expected 0 (off) or a number of seconds from 1 to 2592000 (30 days), got 0.5"),
        (MINIMAL + "[est]\ncacerts_refresh_seconds = 2592001\n", "est.cacerts_refresh_seconds: expected 0 (off) or a number of seconds from 1 to 2592000 (30 days), got 2592001"),
        (MINIMAL + "[metrics]\ninterval_seconds = 0\n", "metrics.interval_seconds: expected a number of seconds from 1 to 3600, got 0"),
    ],
)  # fmt: skip
def test_bad_values_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {message}"
    assert "\n" not in str(info.value)


def test_integer_too_long_for_python_is_a_config_error(tmp_path: Path) -> None:
    """tomllib raises a bare ValueError (not TOMLDecodeError) for an integer of 5000 digits."""
    path = write(tmp_path, MINIMAL + "[est]\nmax_response_bytes = " + "9" * 5000 + "\n")
    with pytest.raises(
        ConfigError, match=r"config\.toml: invalid TOML: a value cannot be read"
    ) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_ints_are_accepted_where_numbers_are_expected() -> None:
    config = parse_config(MINIMAL + "[est]\nconnect_timeout_seconds = 5\n")
    assert config.est.connect_timeout_seconds == 5.0
    assert isinstance(config.est.connect_timeout_seconds, float)


def test_empty_string_means_unset_only_for_optional_keys() -> None:
    """As config.example.toml says: "" is "not set" for optional values; required paths refuse it."""
    config = parse_config(MINIMAL + "[tpm]\nopenssl_provider = ''\n[est]\ntrust_anchor = ''\n")
    assert (config.tpm.openssl_provider, config.est.trust_anchor) == (None, None)
    with pytest.raises(ConfigError, match=r"paths\.state_dir: expected a path string, got ''"):
        parse_config(MINIMAL + "[paths]\nstate_dir = ''\n")


# Keys the schema holds for the long-running service (`devid-agent run`), which is not part of
# this code base yet: config.example.toml says so. Every other key must be read somewhere.
RESERVED_FOR_SERVICE: set[str] = set()  # every key is read by something now


def test_every_key_is_read_somewhere() -> None:
    """A documented key that nothing reads is a setting that silently does nothing."""
    import re

    sources = "\n".join(
        p.read_text()
        for folder in ("agent", "hal")
        for p in (ROOT / folder).rglob("*.py")
        if p.name != "config.py"
    )
    unread = [
        key
        for key in _keys(Config)
        if key not in RESERVED_FOR_SERVICE
        and not re.search(rf"\.{re.escape(key.split('.')[-1])}\b", sources)
    ]
    assert unread == []
    example = EXAMPLE.read_text()
    for key in RESERVED_FOR_SERVICE:
        assert not re.search(rf"\.{key.split('.')[-1]}\b", sources), f"{key} is read now"
        section, name = key.split(".")
        block = example.split(f"[{section}]")[1].split(f"\n{name} =")[0]
        assert "devid-agent run" in block, f"config.example.toml must say {key} is for the service"


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


def test_readme_exit_codes_match_the_cli() -> None:
    import re

    import agent.cli

    readme = (ROOT / "README.md").read_text()
    table = readme.split("### Exit codes", 1)[1].split("\n\n", 2)[1]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", table, flags=re.M)}
    defined = {
        v for k, v in vars(agent.cli).items() if k.startswith("EXIT_") and isinstance(v, int)
    }
    assert documented == defined


def test_cli_config_option_before_and_after_the_subcommand(tmp_path: Path) -> None:
    good = write(tmp_path, MINIMAL)
    bad = tmp_path / "missing.toml"
    # After the subcommand wins (it is the nearer one); before it works alone.
    assert run_cli("--config", str(bad), "config", "check", "--config", str(good)).returncode == 0
    assert run_cli("--config", str(good), "config", "check").returncode == 0
    assert run_cli("config", "check", "--config", str(bad)).returncode == 78
