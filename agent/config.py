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
import enum
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.config_file import CONFIG_ENV, DEFAULT_CONFIG_PATH, MAX_CONFIG_BYTES, config_path
from agent.config_file import read_config_text as _read_config_text
from agent.config_loader import Loader, checked
from agent.errors import ConfigError
from hal.interfaces import KeyAlgorithm

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "MAX_CONFIG_BYTES",
    "BootloaderKind",
    "Config",
    "CounterKind",
    "KeyStoreKind",
    "ProofOfPossession",
    "checked",
    "config_path",
    "load_config",
    "parse_config",
]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]


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


def _group_name(value: str) -> str | None:
    ok = value == "" or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}", value) is not None
    return None if ok else 'a group name (letters, digits, "_", "-", "."; at most 32) or ""'


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
    #: a group whose members (other local services) may read the identity's certificates
    #: (cert.pem, chain.pem, fullchain.pem; never the key); "" = none. It must exist (checked
    #: by `config check` and every command that uses the identity)
    identity_group: str = checked("", check=_group_name)


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
    ok = 2 <= value <= 100
    return None if ok else "an integer from 2 (the current and previous generation) to 100"


# Upper bounds: a value past them is a typo, and would fail later where it is used (a timer of
# 1e308 s overflows, a Retry-After bound of 1e12 s is past year 9999).
MAX_TIMEOUT_SECONDS = 3600.0
MAX_RETRY_AFTER_SECONDS = 30 * 86400.0
MAX_CLOCK_SKEW_SECONDS = 86400.0
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


def _timeout(value: float) -> str | None:
    ok = 0 < value <= MAX_TIMEOUT_SECONDS
    return None if ok else f"a number of seconds greater than 0, at most {MAX_TIMEOUT_SECONDS:g}"


def _retry_after(value: float) -> str | None:
    ok = 0 <= value <= MAX_RETRY_AFTER_SECONDS
    return None if ok else f"a number of seconds from 0 to {MAX_RETRY_AFTER_SECONDS:g} (30 days)"


def _retry_after_max(value: float) -> str | None:
    ok = 0 < value <= MAX_RETRY_AFTER_SECONDS
    return (
        None if ok else f"a number of seconds greater than 0, at most {MAX_RETRY_AFTER_SECONDS:g}"
    )


def _clock_skew(value: float) -> str | None:
    ok = 0 <= value <= MAX_CLOCK_SKEW_SECONDS
    return None if ok else f"a number of seconds from 0 to {MAX_CLOCK_SKEW_SECONDS:g} (a day)"


MAX_CSRATTRS_AGE_SECONDS = 30 * 86400


def _csrattrs_age(value: float) -> str | None:
    ok = 0 <= value <= MAX_CSRATTRS_AGE_SECONDS
    return None if ok else f"a number of seconds from 0 to {MAX_CSRATTRS_AGE_SECONDS} (30 days)"


def _response_bytes(value: int) -> str | None:
    ok = 1 <= value <= MAX_RESPONSE_BYTES
    return None if ok else f"an integer from 1 to {MAX_RESPONSE_BYTES} (64 MiB)"


def _basic_username(value: str) -> str | None:
    return None if ":" not in value else "a user name without ':' (HTTP Basic, RFC 7617)"


def _cacerts_refresh(value: float) -> str | None:
    ok = value == 0 or 1 <= value <= 30 * 86400
    return None if ok else "0 (off) or a number of seconds from 1 to 2592000 (30 days)"


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
    username: str = checked("", check=_basic_username)
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
    csrattrs_max_age_seconds: float = checked(86400.0, check=_csrattrs_age)
    connect_timeout_seconds: float = checked(10.0, check=_timeout)
    read_timeout_seconds: float = checked(30.0, check=_timeout)
    max_response_bytes: int = checked(1024 * 1024, check=_response_bytes)
    #: bounds on a server's 202 Retry-After, and the wait when it gives none
    retry_after_min_seconds: float = checked(10.0, check=_retry_after)
    retry_after_max_seconds: float = checked(86400.0, check=_retry_after_max)
    retry_after_default_seconds: float = checked(300.0, check=_retry_after)
    #: tolerance for the device clock when checking the issued certificate's validity
    clock_skew_seconds: float = checked(300.0, check=_clock_skew)
    #: identity generations kept on disk (current included)
    generations_kept: int = checked(3, check=_at_least_two)
    #: the service fetches /cacerts about this often (a CA rollover, RFC 7030 4.1.3); 0 = off
    cacerts_refresh_seconds: float = checked(86400.0, check=_cacerts_refresh)


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


def _download_ca(value: str) -> str | None:
    ok = value in ("", "system") or Path(value).is_absolute()
    return None if ok else 'a PEM file by absolute path, "system" (the system store) or ""'


def _crl_url(value: str) -> str | None:
    ok = value.startswith(("https://", "http://")) and not any(ch.isspace() for ch in value)
    return None if ok else "an http:// or https:// URL (a CRL is signed: plain HTTP is usual)"


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
    #: where `firmware crl refresh` stores the CRLs it fetched and checked (root's, 0700); the
    #: verifier uses them besides crl_files
    crl_dir: Path = checked(Path("/var/lib/devid-agent-firmware/crl"), check=_absolute_path)
    #: CRLs `crl refresh` fetches besides the distribution points in the anchors' certificates
    crl_urls: tuple[str, ...] = checked((), item_check=_crl_url)
    #: PEM file of intermediate CAs (each issued by a trust anchor) whose CRLs `crl refresh`
    #: accepts and whose distribution points it reads; they are not trust anchors
    crl_issuers: Path | None = checked(None, check=_optional_absolute_path)
    #: TLS trust for `install https://...`: a PEM file, "system" (the system store, warned on
    #: each use) or "" (HTTPS downloads off)
    download_ca: str = checked("", check=_download_ca)
    download_connect_timeout_seconds: float = checked(10.0, check=_timeout)
    #: the longest wait for the next bytes of a download (or a CRL) before it is abandoned
    download_read_timeout_seconds: float = checked(30.0, check=_timeout)
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


def _window_fraction(value: float) -> str | None:
    return None if 0.05 <= value <= 0.95 else "a share of the lifetime from 0.05 to 0.95"


def _retry_seconds(value: float) -> str | None:
    ok = 1 <= value <= 7 * 86400
    return None if ok else "a number of seconds from 1 to 604800 (7 days)"


def _wait_share(value: float) -> str | None:
    return None if 0.01 <= value <= 0.5 else "a share of the time left from 0.01 to 0.5"


def _attempt_seconds(value: float) -> str | None:
    return None if 2 <= value <= 86400 else "a number of seconds from 2 to 86400"


@dataclass(frozen=True)
class RenewalConfig:
    """When the daemon renews (agent/renewal.py)."""

    #: the renewal point is drawn once per certificate in this share of its lifetime
    window_start_fraction: float = checked(0.55, check=_window_fraction)
    window_end_fraction: float = checked(0.70, check=_window_fraction)
    #: backoff after failures: full jitter, doubling from min to max (seconds)
    retry_min_seconds: float = checked(60.0, check=_retry_seconds)
    retry_max_seconds: float = checked(4 * 3600.0, check=_retry_seconds)
    #: no wait longer than this share of the time the certificate has left
    max_wait_share_of_time_left: float = checked(0.25, check=_wait_share)
    #: an attempt (its own process, agent/attempt_process.py) still at work after this long is
    #: stopped and counted as a failure; well above the EST timeouts of all its requests
    attempt_timeout_seconds: float = checked(600.0, check=_attempt_seconds)


def _hook_seconds(value: float) -> str | None:
    return None if 1 <= value <= 600 else "a number of seconds from 1 to 600"


def _argv(value: tuple[str, ...]) -> str | None:
    if not value:
        return "a non-empty argument list"
    return (
        None
        if value[0].startswith("/")
        else "an argument list whose first item is an absolute path"
    )


@dataclass(frozen=True)
class HooksConfig:
    #: commands run after every rotation, each an argument list (no shell), with DEVID_CERT,
    #: DEVID_KEY, DEVID_CHAIN, DEVID_FULLCHAIN, DEVID_GENERATION set; a failure is reported
    post_rotate: tuple[tuple[str, ...], ...] = checked((), item_check=_argv)
    timeout_seconds: float = checked(60.0, check=_hook_seconds)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = checked("info", check=_log_level)


def _audit_bytes(value: int) -> str | None:
    ok = 16 * 1024 <= value <= 64 * 1024 * 1024
    return None if ok else "an integer from 16384 to 67108864 (64 MiB)"


def _keep_files(value: int) -> str | None:
    return None if 1 <= value <= 100 else "an integer from 1 to 100"


@dataclass(frozen=True)
class AuditConfig:
    #: an audit file is rotated before it would pass this size
    max_bytes: int = checked(1024 * 1024, check=_audit_bytes)
    #: rotated files kept (audit.jsonl.1 .. audit.jsonl.N)
    keep_files: int = checked(4, check=_keep_files)


def _metrics_interval(value: float) -> str | None:
    return None if 1 <= value <= 3600 else "a number of seconds from 1 to 3600"


@dataclass(frozen=True)
class MetricsConfig:
    #: Prometheus textfile for node_exporter (written 0644, atomically); None = off
    textfile: Path | None = checked(None, check=_optional_absolute_path)
    #: the service rewrites it this often (seconds), and after every renewal attempt
    interval_seconds: float = checked(60.0, check=_metrics_interval)


def _share(value: float) -> str | None:
    return None if 0 < value <= 1 else "a share of the lifetime, above 0 and at most 1"


@dataclass(frozen=True)
class StatusConfig:
    #: `status` exits 85 when renewals fail and less than this share of the lifetime is left
    renewal_failing_share: float = checked(0.2, check=_share)


def _request_timeout(value: float) -> str | None:
    return None if 0.1 <= value <= 60 else "seconds from 0.1 to 60"


def _max_clients(value: int) -> str | None:
    return None if 1 <= value <= 256 else "an integer from 1 to 256"


@dataclass(frozen=True)
class ControlConfig:
    #: serve paths.run_dir/control.sock from `devid-agent run`; `status` then expects the service
    #: (exit 87 when it does not run). false on devices that only use the one-shot enroll unit
    enabled: bool = True
    #: a group whose members may ask read-only requests (status, ping); "" = none
    readers_group: str = checked("", check=_group_name)
    #: a connection that has not sent a whole request (or read its answer) within this is dropped
    request_timeout_seconds: float = checked(5.0, check=_request_timeout)
    #: connections served at once; more are answered "busy" and closed
    max_clients: int = checked(16, check=_max_clients)


# -- the MQTT device channel (agent/mqtt/) --------------------------------------------------------

#: characters MQTT gives a meaning in topics (wildcards, the level separator) or forbids (NUL)
MQTT_TOPIC_SPECIAL = ("+", "#", "/", "\x00")
MAX_MQTT_PAYLOAD_BYTES = 1024 * 1024


def _mqtt_broker(value: str) -> str | None:
    from urllib.parse import urlsplit

    expected = "an mqtts://host[:port] URL (TLS only; port 8883 when omitted)"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return expected
    if parts.scheme != "mqtts" or not parts.hostname or parts.path not in ("", "/"):
        return expected
    if parts.query or parts.fragment or parts.username or parts.password:
        return expected
    try:
        parts.hostname.encode("idna")
    except UnicodeError:
        return "an mqtts:// URL whose host is a valid DNS name"
    return None


def _topic_prefix(value: str) -> str | None:
    bad = any(ch in value for ch in ("+", "#", "\x00")) or value.startswith(("$", "/"))
    if not value or bad or value.endswith("/") or "//" in value or len(value) > 128:
        return (
            "a topic prefix of 1 to 128 characters without '+', '#', NUL, a leading '$' or "
            "'/', a trailing '/' or an empty level"
        )
    return None


def _client_id(value: str) -> str | None:
    if any(ch in value for ch in MQTT_TOPIC_SPECIAL) or len(value) > 128:
        return "a client id of at most 128 characters without '+', '#', '/' or NUL"
    return None


def _keepalive(value: int) -> str | None:
    return None if 5 <= value <= 65535 else "an integer from 5 to 65535 (seconds)"


def _reconnect_seconds(value: float) -> str | None:
    return None if 0.1 <= value <= 86400 else "a number of seconds from 0.1 to 86400 (a day)"


def _qos(value: int) -> str | None:
    return None if value in (1, 2) else "1 or 2 (events and commands must not be lost)"


def _mqtt_protocol(value: str) -> str | None:
    return None if value in ("5", "3.1.1") else "'5' or '3.1.1'"


def _status_interval(value: float) -> str | None:
    return None if 10 <= value <= 86400 else "a number of seconds from 10 to 86400 (a day)"


def _payload_bytes(value: int) -> str | None:
    ok = 1024 <= value <= MAX_MQTT_PAYLOAD_BYTES
    return None if ok else f"an integer from 1024 to {MAX_MQTT_PAYLOAD_BYTES} (1 MiB)"


def _session_expiry(value: int) -> str | None:
    return None if 0 <= value <= 7 * 86400 else "an integer from 0 to 604800 (seconds; 7 days)"


def _queue_events(value: int) -> str | None:
    return None if 1 <= value <= 10000 else "an integer from 1 to 10000"


@dataclass(frozen=True)
class MqttConfig:
    """The device channel (docs/mqtt.md); on when `brokers` is not empty."""

    #: mqtts://host[:port] URLs of one broker or a cluster, tried in order (failover)
    brokers: tuple[str, ...] = checked((), item_check=_mqtt_broker)
    #: PEM file of the CA(s) that authenticate the broker (explicit: never the system store)
    ca_file: Path | None = checked(None, check=_optional_absolute_path)
    #: topics are <topic_prefix>/<device id>/status, .../events, .../commands
    topic_prefix: str = checked("devid", check=_topic_prefix)
    #: the MQTT client id ("" = the device id)
    client_id: str = checked("", check=_client_id)
    keepalive_seconds: int = checked(60, check=_keepalive)
    #: reconnect delays: a per-device phase grid, its step doubling between these bounds
    reconnect_min_seconds: float = checked(1.0, check=_reconnect_seconds)
    reconnect_max_seconds: float = checked(120.0, check=_reconnect_seconds)
    #: QoS of events, status and the commands subscription
    qos: int = checked(1, check=_qos)
    #: "5" (MQTT v5) or "3.1.1"
    protocol: str = checked("5", check=_mqtt_protocol)
    #: the retained status is published on connect, on change and at least this often
    status_interval_seconds: float = checked(300.0, check=_status_interval)
    #: the largest message sent or accepted; a bigger command is refused
    max_payload_bytes: int = checked(64 * 1024, check=_payload_bytes)
    #: how long the broker keeps the session (subscriptions, queued QoS 1 messages) while the
    #: device is away (MQTT v5 Session Expiry Interval; 3.1.1 sessions are kept by the broker)
    session_expiry_seconds: int = checked(3600, check=_session_expiry)
    #: events kept while disconnected; beyond it the oldest are dropped (and counted)
    offline_queue_events: int = checked(100, check=_queue_events)
    #: PEM file of the anchors that command signers must chain to ("" = commands refused)
    command_trust_anchor: Path | None = checked(None, check=_optional_absolute_path)
    #: accept commands without a signature (labs only; warned about at every command)
    insecure_unsigned_commands: bool = False
    connect_timeout_seconds: float = checked(10.0, check=_timeout)

    @property
    def enabled(self) -> bool:
        return bool(self.brokers)


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
    renewal: RenewalConfig = field(default_factory=RenewalConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    #: where this config was read from (not a TOML key)
    source: Path = field(default=Path("<defaults>"), metadata={"internal": True})
    #: the text it was parsed from, so that the service's attempt process works under exactly
    #: this config, not whatever the file holds by then (agent/attempt_process.py)
    text: str = field(default="", repr=False, compare=False, metadata={"internal": True})


def parse_config(text: str, *, source: Path = Path("<string>")) -> Config:
    """Parse TOML text into a Config, or raise one-line ConfigError."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from e
    except ValueError as e:  # e.g. an integer literal of thousands of digits (int() refuses it)
        raise ConfigError(f"{source}: invalid TOML: a value cannot be read ({e})") from e
    except RecursionError as e:  # arrays or inline tables nested hundreds deep (found by fuzzing)
        raise ConfigError(f"{source}: invalid TOML: values nested too deeply") from e
    loader = Loader(source)
    config = loader.build(Config, table)
    _check_subject(loader, config)
    config = dataclasses.replace(config, source=source, text=text)
    check_cross_keys(config)
    return config


def check_cross_keys(config: Config) -> None:
    """The rules that tie keys together, for every config however it was built (the loader
    runs them; so does a command given a Config made in code)."""
    est, where = config.est, config.source

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: {message}")

    if est.retry_after_min_seconds > est.retry_after_max_seconds:
        raise fail(
            "est.retry_after_min_seconds",
            f"{est.retry_after_min_seconds:g} exceeds est.retry_after_max_seconds "
            f"({est.retry_after_max_seconds:g})",
        )
    if (est.idevid_cert is None) != (est.idevid_key is None):
        missing = "est.idevid_key" if est.idevid_key is None else "est.idevid_cert"
        raise fail(missing, "not set; est.idevid_cert and est.idevid_key go together")
    if bool(est.username) != (est.password_file is not None):
        missing = "est.password_file" if est.password_file is None else "est.username"
        raise fail(missing, "not set; est.username and est.password_file go together")
    renewal = config.renewal
    if renewal.window_start_fraction > renewal.window_end_fraction:
        raise fail(
            "renewal.window_start_fraction",
            f"{renewal.window_start_fraction:g} exceeds renewal.window_end_fraction "
            f"({renewal.window_end_fraction:g})",
        )
    if renewal.retry_min_seconds > renewal.retry_max_seconds:
        raise fail(
            "renewal.retry_min_seconds",
            f"{renewal.retry_min_seconds:g} exceeds renewal.retry_max_seconds "
            f"({renewal.retry_max_seconds:g})",
        )
    if est.proof_of_possession is ProofOfPossession.ALWAYS and config.tls.min_version == "1.3":
        raise fail(
            "est.proof_of_possession",
            "'always' needs TLS 1.2 (tls-unique), but tls.min_version is '1.3'",
        )
    _check_mqtt(config, fail)


def _check_mqtt(config: Config, fail: Callable[[str, str], ConfigError]) -> None:
    mqtt = config.mqtt
    if not mqtt.enabled:
        return
    if mqtt.ca_file is None:
        raise fail("mqtt.ca_file", "not set; the broker's CA file is required with mqtt.brokers")
    if mqtt.reconnect_min_seconds > mqtt.reconnect_max_seconds:
        raise fail(
            "mqtt.reconnect_min_seconds",
            f"{mqtt.reconnect_min_seconds:g} exceeds mqtt.reconnect_max_seconds "
            f"({mqtt.reconnect_max_seconds:g})",
        )
    special = [ch for ch in MQTT_TOPIC_SPECIAL if ch in config.device.id]
    if special:
        raise fail(
            "device.id",
            f"{config.device.id!r} contains {special[0]!r}, which MQTT topics cannot carry "
            "(mqtt.brokers is set)",
        )


def _check_subject(loader: Loader, config: Config) -> None:
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
    """Read (`agent.config_file`) and parse the config file at `path`."""
    return parse_config(_read_config_text(path), source=path)
