"""TOML configuration -> frozen dataclasses.

Every section is a frozen dataclass; the loader walks the dataclass fields, so the schema *is*
the dataclasses below. Each error is one `ConfigError` line naming the file, the key path and
what was expected: `config.toml: keys.algorithm: expected one of 'ec-p256', ..., got 'ec-p521'`.

A field's `metadata` may carry `check`: a function of the value that returns an error text
(what was expected) or None. `config.example.toml` documents every key with its default; a test
keeps the two in step.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import enum
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import ConfigError
from hal.interfaces import KeyAlgorithm

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

DEFAULT_CONFIG_PATH = Path("/etc/devid-agent/config.toml")
CONFIG_ENV = "DEVID_AGENT_CONFIG"
MAX_CONFIG_BYTES = 1024 * 1024

Check = Callable[[Any], "str | None"]


def checked(
    default: Any = dataclasses.MISSING,
    *,
    check: Check | None = None,
    item_check: Check | None = None,
    **kw: Any,
) -> Any:
    """A dataclass field with a validity check (returns what was expected, or None).

    `item_check` checks each item of a list value (the error names the item: `key[2]`).
    """
    metadata = {"check": check, "item_check": item_check}
    if isinstance(default, (list, tuple)):
        value = tuple(default)
        return field(default_factory=lambda: value, metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def _positive(value: Any) -> str | None:
    return None if value > 0 else "a number greater than 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "a number of 0 or more"


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "a non-empty string"


# RFC 5280 upper bounds (ub-common-name, ub-serial-number, ub-organization-name,
# ub-organizational-unit-name): 64 characters each.
_X520_MAX = 64


def _device_id(value: str) -> str | None:
    if not value.strip():
        return "a non-empty string"
    if len(value) > _X520_MAX:
        return f"at most {_X520_MAX} characters (the X.509 limit for commonName and serialNumber)"
    return None


def _x520_optional(value: str) -> str | None:
    ok = len(value) <= _X520_MAX
    return None if ok else f"at most {_X520_MAX} characters (the X.509 limit for this attribute)"


_DEVICE_ID = "{device_id}"


def _san_uri(value: str) -> str | None:
    value = value.replace(_DEVICE_ID, "x")
    ok = value.isascii() and re.match(r"[A-Za-z][A-Za-z0-9+.-]*:\S", value) is not None
    ok = ok and not any(ch.isspace() for ch in value)
    return None if ok else 'an ASCII URI with a scheme, e.g. "urn:example:device:{device_id}"'


def _san_dns(value: str) -> str | None:
    value = value.replace(_DEVICE_ID, "x")
    ok = value.isascii() and re.fullmatch(r"[A-Za-z0-9*_.-]+", value) is not None
    return None if ok else "an ASCII DNS name (A-label; IDNs must be punycode)"


def _absolute_path(value: Path) -> str | None:
    return None if value.is_absolute() else "an absolute path"


def _optional_absolute_path(value: Path | None) -> str | None:
    return None if value is None or value.is_absolute() else "an absolute path"


def _tls_version(value: str) -> str | None:
    return None if value in ("1.2", "1.3") else "'1.2' or '1.3'"


def _log_level(value: str) -> str | None:
    levels = ("debug", "info", "warning", "error")
    return None if value in levels else "one of " + ", ".join(repr(v) for v in levels)


# ---------------------------------------------------------------------------------------------
# The schema


@dataclass(frozen=True)
class DeviceConfig:
    #: the device's stable identifier; goes into the certificate subject (CN and/or serialNumber)
    id: str = checked(check=_device_id)


@dataclass(frozen=True)
class PathsConfig:
    #: identity generations, CA certificates and scheduler state
    state_dir: Path = checked(Path("/var/lib/devid-agent"), check=_absolute_path)
    #: control socket
    run_dir: Path = checked(Path("/run/devid-agent"), check=_absolute_path)


class KeyStoreKind(enum.Enum):
    TPM = "tpm"
    SOFTWARE = "software"


@dataclass(frozen=True)
class KeysConfig:
    #: "tpm" (keys generated in and never leaving the TPM) or "software" (key files; weaker)
    store: KeyStoreKind = KeyStoreKind.TPM
    #: algorithm of the operational key
    algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256


@dataclass(frozen=True)
class TpmConfig:
    #: TSS2 TCTI string: "device:/dev/tpmrm0" on hardware, "swtpm:host=...,port=..." for swtpm
    tcti: str = checked("device:/dev/tpmrm0", check=_non_empty)
    #: path to tpm2-openssl's tpm2.so (>= 1.2); None: the system's OpenSSL modules directory
    openssl_provider: Path | None = checked(None, check=_optional_absolute_path)


@dataclass(frozen=True)
class SubjectConfig:
    #: put the device id into the subject's commonName
    common_name: bool = True
    #: put the device id into the subject's serialNumber attribute
    serial_number: bool = False
    organization: str = checked("", check=_x520_optional)
    organizational_unit: str = checked("", check=_x520_optional)
    #: subjectAltName URIs; "{device_id}" is replaced by the device id
    san_uris: tuple[str, ...] = checked((), item_check=_san_uri)
    #: subjectAltName DNS names; "{device_id}" is replaced by the device id
    san_dns: tuple[str, ...] = checked((), item_check=_san_dns)


@dataclass(frozen=True)
class TlsConfig:
    #: lowest TLS version offered; 1.2 is the floor (many EST servers are 1.2-only)
    min_version: str = checked("1.2", check=_tls_version)


class ProofOfPossession(enum.Enum):
    """EST proof-of-possession: the CSR's challengePassword carries TLS 1.2 tls-unique."""

    AUTO = "auto"  # when the enroll connection is TLS 1.2 (TLS 1.3 has no tls-unique)
    ALWAYS = "always"  # cap the enroll connection at TLS 1.2 so tls-unique exists
    NEVER = "never"


def _est_url(value: str) -> str | None:
    if not value:
        return None
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return "an https:// URL"
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
        return 'an https://host[:port][/prefix] URL (or "" when EST is not used)'
    try:
        parts.hostname.encode("idna")  # what socket.connect and TLS SNI will do with it
    except UnicodeError:
        return "an https:// URL whose host is a valid DNS name (labels of 1 to 63 characters)"
    return None


def _est_label(value: str) -> str | None:
    ok = all(ch.isalnum() or ch in "-_." for ch in value)
    return None if ok else "a CA label of letters, digits, '-', '_' or '.'"


def _sha256_fingerprint(value: str) -> str | None:
    digits = value.replace(":", "").strip().lower()
    if not value or (len(digits) == 64 and all(ch in "0123456789abcdef" for ch in digits)):
        return None
    return "a SHA-256 fingerprint (64 hex digits, colons allowed)"


def _at_least_two(value: int) -> str | None:
    return None if value >= 2 else "an integer of 2 or more (the current and previous generation)"


@dataclass(frozen=True)
class EstConfig:
    #: the EST server, "https://host[:port]"; "" = EST enrollment not configured
    url: str = checked("", check=_est_url)
    #: optional CA label: /.well-known/est/<label>/...
    label: str = checked("", check=_est_label)
    #: PEM file of the CA(s) that authenticate the EST server's TLS certificate
    trust_anchor: Path | None = checked(None, check=_optional_absolute_path)
    #: first-contact bootstrap (RFC 7030 4.1.1): SHA-256 of the EST CA certificate
    bootstrap_fingerprint_sha256: str = checked("", check=_sha256_fingerprint)
    #: HTTP Basic user name ("" = no Basic authentication)
    username: str = ""
    #: file holding the Basic password; must not be group- or world-readable
    password_file: Path | None = checked(None, check=_optional_absolute_path)
    #: send Basic credentials with the first request instead of after a 401 challenge
    send_credentials_upfront: bool = False
    #: manufacturer IDevID certificate presented as TLS client certificate at first enrollment
    idevid_cert: Path | None = checked(None, check=_optional_absolute_path)
    #: the IDevID's key: a TSS2 PRIVATE KEY (TPM) or PEM key file
    idevid_key: Path | None = checked(None, check=_optional_absolute_path)
    proof_of_possession: ProofOfPossession = ProofOfPossession.AUTO
    #: fetch /csrattrs and honour key type, hash and subject attributes it asks for
    use_csrattrs: bool = True
    #: a /csrattrs answer is reused this long (and while the CA set is the same); 0 = never
    csrattrs_max_age_seconds: float = checked(86400.0, check=_non_negative)
    connect_timeout_seconds: float = checked(10.0, check=_positive)
    read_timeout_seconds: float = checked(30.0, check=_positive)
    max_response_bytes: int = checked(1024 * 1024, check=_positive)
    #: bounds on a server's 202 Retry-After, and the wait when it gives none
    retry_after_min_seconds: float = checked(10.0, check=_non_negative)
    retry_after_max_seconds: float = checked(86400.0, check=_positive)
    retry_after_default_seconds: float = checked(300.0, check=_non_negative)
    #: tolerance for the device clock when checking the issued certificate's validity
    clock_skew_seconds: float = checked(300.0, check=_non_negative)
    #: identity generations kept on disk (current included)
    generations_kept: int = checked(3, check=_at_least_two)


class BootloaderKind(enum.Enum):
    UBOOT = "uboot"
    GRUB = "grub"
    FILE = "file"


class CounterKind(enum.Enum):
    TPM = "tpm"
    FILE = "file"


def _nv_index(value: int) -> str | None:
    ok = 0x01000000 <= value <= 0x01BFFFFF
    return None if ok else "an owner NV index from 0x01000000 to 0x01BFFFFF"


def _boot_tries(value: int) -> str | None:
    return None if 1 <= value <= 99 else "an integer from 1 to 99"


def _required_signers(value: int) -> str | None:
    return None if 1 <= value <= 4 else "an integer from 1 to 4 (a bundle carries at most 4)"


def _buffer_kib(value: int) -> str | None:
    return None if 4 <= value <= 65536 else "an integer from 4 to 65536"


@dataclass(frozen=True)
class FirmwareConfig:
    #: this hardware's compatible string; a bundle must name exactly this ("" = firmware off)
    compatible: str = ""
    #: PEM file with the firmware signing trust anchor(s) (root CA certificates)
    trust_anchors: Path = checked(Path("/etc/devid-agent/firmware-ca.pem"), check=_absolute_path)
    #: CRL files (PEM or DER) checked against every certificate of the signer chain
    crl_files: tuple[Path, ...] = checked(())
    #: distinct signer keys (each chaining to a trust anchor) that must sign a bundle
    required_signers: int = checked(1, check=_required_signers)
    #: root's per-slot records, lock, TPM counter baseline and file counter (0700). Must lie
    #: outside every directory the service user owns: root's firmware commands refuse a path
    #: with an ancestor another user could write (docs/security.md)
    state_dir: Path = checked(Path("/var/lib/devid-agent-firmware/private"), check=_absolute_path)
    #: a world-readable copy of `firmware status --json`, rewritten by root after every firmware
    #: command; what the service and other users read instead of root's state
    status_snapshot: Path | None = checked(
        Path("/var/lib/devid-agent-firmware/status.json"), check=_optional_absolute_path
    )
    #: "uboot" (fw_setenv), "grub" (grub-editenv) or "file" (development)
    bootloader: BootloaderKind = BootloaderKind.UBOOT
    #: libubootenv's config naming the environment copies
    uboot_env_config: Path = checked(Path("/etc/fw_env.config"), check=_absolute_path)
    #: GRUB environment block
    grub_env: Path = checked(Path("/boot/grub/grubenv"), check=_absolute_path)
    #: the bootloader tools, by absolute path (run with a fixed PATH and LC_ALL=C)
    fw_printenv: Path = checked(Path("/usr/bin/fw_printenv"), check=_absolute_path)
    fw_setenv: Path = checked(Path("/usr/bin/fw_setenv"), check=_absolute_path)
    grub_editenv: Path = checked(Path("/usr/bin/grub-editenv"), check=_absolute_path)
    #: environment file of the "file" bootloader
    file_env: Path = checked(
        Path("/var/lib/devid-agent-firmware/private/bootenv"), check=_absolute_path
    )
    #: slot A and slot B: block devices (or files)
    slot_a: Path = checked(Path("/dev/disk/by-partlabel/rootfs_a"), check=_absolute_path)
    slot_b: Path = checked(Path("/dev/disk/by-partlabel/rootfs_b"), check=_absolute_path)
    #: where the booted slot is read from, and the key naming it (RAUC: rauc.slot=A)
    cmdline: Path = checked(Path("/proc/cmdline"), check=_absolute_path)
    cmdline_key: str = checked("rauc.slot", check=_non_empty)
    #: at the first commit after an install, hash the booted slot and refuse to commit (and to
    #: raise the counter) unless it holds the installed image. Needs a root filesystem that
    #: booting leaves unchanged (squashfs, dm-verity, ext4 mounted ro): with a read-write root
    #: every commit would be refused and every update would fall back.
    check_slot_at_commit: bool = False
    #: boots a newly installed slot gets before the bootloader falls back (U-Boot; GRUB has 1)
    boot_tries: int = checked(3, check=_boot_tries)
    #: anti-rollback counter: "tpm" (NV counter index) or "file" (weaker)
    counter: CounterKind = CounterKind.TPM
    #: TPM NV index of the counter (TPM2_NT_COUNTER, defined on first commit)
    counter_nv_index: int = checked(0x01500100, check=_nv_index)
    #: file holding the TPM owner hierarchy's auth value ("" = empty auth)
    counter_owner_auth_file: Path | None = checked(None, check=_optional_absolute_path)
    #: I/O buffer for streaming payloads, in KiB
    buffer_kib: int = checked(1024, check=_buffer_kib)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = checked("info", check=_log_level)


@dataclass(frozen=True)
class Config:
    device: DeviceConfig
    paths: PathsConfig = field(default_factory=PathsConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    tpm: TpmConfig = field(default_factory=TpmConfig)
    subject: SubjectConfig = field(default_factory=SubjectConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    est: EstConfig = field(default_factory=EstConfig)
    firmware: FirmwareConfig = field(default_factory=FirmwareConfig)
    #: where this config was read from (not a TOML key)
    source: Path = field(default=Path("<defaults>"), metadata={"internal": True})


# ---------------------------------------------------------------------------------------------
# The loader

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        item = _type_name(typing.get_args(tp)[0]).removeprefix("a ").removeprefix("an ")
        return f"a list of {item}s"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        Path: "a path string",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _show(value: Any) -> str:
    """A value as the error shows it: short, and never more than one line (repr escapes)."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return f"a TOML date/time ({value.isoformat()})"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**60:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_INT64 = (-(2**63), 2**63 - 1)


def _key(name: str) -> str:
    """A TOML key as written in the file: bare, or quoted (escaped, so always one line)."""
    if _BARE_KEY.fullmatch(name):
        return name
    return '"' + name.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


class _Loader:
    def __init__(self, source: Path) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {message}")

    def expected(self, key: str, what: str, value: Any) -> ConfigError:
        return self.fail(key, f"expected {what}, got {_show(value)}")

    def convert(self, key: str, tp: Any, value: Any) -> Any:
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            # TOML has no null: "" means "not set" for optional values
            if value == "":
                return None
            return self.convert(key, args[0], value)
        if origin is tuple:
            if not isinstance(value, list):
                raise self.expected(key, _type_name(tp), value)
            (item_tp, _ellipsis) = typing.get_args(tp)
            return tuple(self.convert(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value))
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise self.expected(key, "a table", value)
            return self.build(tp, value, prefix=f"{key}.")
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            for member in tp:
                if value == member.value:
                    return member
            hint = ""
            if isinstance(value, str):
                folded = [m.value for m in tp if str(m.value).lower() == value.strip().lower()]
                hint = (
                    f" (values are case-sensitive: did you mean {folded[0]!r}?)" if folded else ""
                )
            raise self.fail(key, f"expected {_type_name(tp)}, got {_show(value)}{hint}")
        if tp is bool:
            if not isinstance(value, bool):
                raise self.expected(key, "true or false", value)
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.expected(key, "an integer", value)
            if not _INT64[0] <= value <= _INT64[1]:
                raise self.expected(key, "an integer that fits in 64 bits (TOML's range)", value)
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.expected(key, "a number", value)
            if isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
                raise self.expected(key, "a number that fits in 64 bits (TOML's range)", value)
            if not math.isfinite(value):
                raise self.expected(key, "a finite number", value)
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise self.expected(key, "a string", value)
            if _CONTROL.search(value):
                raise self.expected(key, "a string without control characters", value)
            return value
        if tp is Path:
            if not isinstance(value, str) or not value:
                raise self.expected(key, "a path string", value)
            if _CONTROL.search(value):
                raise self.expected(key, "a path without control characters", value)
            if not value.startswith("/"):
                raise self.expected(key, "an absolute path", value)
            return Path(value)
        raise TypeError(f"config schema uses an unsupported type at {key}: {tp!r}")

    def build(self, cls: type[T], table: dict[str, Any], *, prefix: str = "") -> T:
        hints = typing.get_type_hints(cls)
        fields = {
            f.name: f
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if not f.metadata.get("internal")
        }
        for name in table:
            if name not in fields:
                close = difflib.get_close_matches(name, list(fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.fail(f"{prefix}{_key(name)}", f"unknown key{hint}")
        values: dict[str, Any] = {}
        for name, f in fields.items():
            key = f"{prefix}{name}"
            if name in table:
                value = self.convert(key, hints[name], table[name])
            elif isinstance(hints[name], type) and dataclasses.is_dataclass(hints[name]):
                if f.default_factory is not dataclasses.MISSING:
                    continue
                value = self.build(hints[name], {}, prefix=f"{key}.")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise self.fail(key, f"missing required key ({_type_name(hints[name])})")
            else:
                continue
            check = f.metadata.get("check")
            if check is not None and value is not None:
                problem = check(value)
                if problem:
                    raise self.expected(key, problem, table.get(name, value))
            item_check = f.metadata.get("item_check")
            if item_check is not None and value is not None:
                for i, item in enumerate(value):
                    problem = item_check(item)
                    if problem:
                        raise self.expected(f"{key}[{i}]", problem, item)
            values[name] = value
        return cls(**values)


def parse_config(text: str, *, source: Path = Path("<string>")) -> Config:
    """Parse TOML text into a Config, or raise one-line ConfigError."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from e
    except ValueError as e:  # e.g. an integer literal of thousands of digits (int() refuses it)
        raise ConfigError(f"{source}: invalid TOML: a value cannot be read ({e})") from e
    loader = _Loader(source)
    config = loader.build(Config, table)
    _check_subject(loader, config)
    return dataclasses.replace(config, source=source)


def _check_subject(loader: _Loader, config: Config) -> None:
    """Cross-key checks: the device id must fit where the subject settings put it."""
    device_id = config.device.id
    for name, check in (("san_uris", _san_uri), ("san_dns", _san_dns)):
        for i, item in enumerate(getattr(config.subject, name)):
            expanded = item.replace(_DEVICE_ID, device_id)
            problem = check(expanded) if _DEVICE_ID in item else None
            if problem:
                raise loader.fail(
                    f"subject.{name}[{i}]",
                    f"with device.id {device_id!r} this becomes {expanded!r}, not {problem}",
                )


def load_config(path: Path) -> Config:
    """Read and parse the config file at `path`."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from e
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: config file is not UTF-8 (byte {e.start})") from e
    return parse_config(text, source=path)


def config_path(explicit: str | None) -> Path:
    """--config, else $DEVID_AGENT_CONFIG, else /etc/devid-agent/config.toml."""
    if explicit is not None:
        if not explicit:
            raise ConfigError("--config: expected a config file path, got ''")
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH
