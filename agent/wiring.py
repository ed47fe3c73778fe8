"""The composition root: the one place where implementations are chosen from the config.

Config in, collaborators out, for the CLI (and the daemon next); tests build their own or pass
overrides. Each builder imports what it builds, so `status` does not pay for EST or TLS.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import BootloaderKind, Config, CounterKind, KeyStoreKind, ProofOfPossession
from agent.errors import ConfigError
from hal import faults
from hal.interfaces import (
    AppendStore,
    BootControl,
    FileStore,
    KeyStore,
    Lock,
    MonotonicCounter,
    Storage,
)

if TYPE_CHECKING:
    import ssl
    from datetime import datetime

    from cryptography import x509

    from agent.audit_log import AuditLog
    from agent.ca_service import CaSource
    from agent.clock import Clock, Interrupt
    from agent.components import Component, Snapshot
    from agent.daemon import Daemon, DaemonParts
    from agent.enroll import Enroller, TransportFactory
    from agent.est.ca_source import EstCaSource
    from agent.est.memory import MemoryStore
    from agent.est.pending import PendingStore
    from agent.firmware.chain import NamedCrl, TrustPolicy
    from agent.firmware.crl import Outcome as CrlOutcome
    from agent.firmware.device import FirmwareDevice
    from agent.firmware.fetch import BundleOpener, DownloadSettings
    from agent.firmware.status import FirmwareStatus
    from agent.identity import Identity, IdentityStore
    from agent.metrics import RenewalFacts
    from agent.mqtt.channel import MqttChannel
    from agent.mqtt.commands import CommandVerifier
    from agent.renewal import RenewalPolicy
    from agent.renewal_state import SchedulerStateStore
    from agent.status import AgentStatus, StatusCollector, TrustStatus
    from hal.openssl_provider import ProviderInfo
    from hal.secure_dir import DirStore


def key_store(config: Config, *, tpm: bool | None = None) -> KeyStore:
    """The configured key store, or with `tpm` the one a given key file needs."""
    if (config.keys.store is KeyStoreKind.TPM) if tpm is None else tpm:
        from hal.tpm import TpmKeyStore

        return TpmKeyStore(tcti=config.tpm.tcti)
    from hal.softkeys import SoftwareKeyStore

    return SoftwareKeyStore()


def load_provider(config: Config) -> ProviderInfo:
    """Load the configured tpm2 OpenSSL provider for the configured TPM into this process."""
    from hal.openssl_provider import load_tpm2_provider

    provider = str(config.tpm.openssl_provider) if config.tpm.openssl_provider else None
    return load_tpm2_provider(provider, tcti=config.tpm.tcti)


def prepare_tls(config: Config) -> ProviderInfo | None:
    """Load the tpm2 OpenSSL provider when TLS will sign with TPM keys. Call before any TLS."""
    if config.keys.store is not KeyStoreKind.TPM:
        return None
    return load_provider(config)


def identity_group(config: Config) -> int | None:
    """The gid of `paths.identity_group`, None when unset; ConfigError when no such group."""
    return _group_gid(config, "paths.identity_group", config.paths.identity_group)


def _group_gid(config: Config, key: str, name: str) -> int | None:
    """The gid of the group `name` that config `key` names (None when ""), or ConfigError."""
    if not name:
        return None
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(
            f"{config.source}: {key}: there is no group {name!r} on this system; "
            f'create it (groupadd {name}) or set ""'
        ) from None


def state_dir_store(config: Config) -> DirStore:
    """Small files directly in `paths.state_dir` (scheduler state, audit trail). Every writer
    there goes through this or `storage(config)`: one without the identity group would make
    state_dir private again, and the group could no longer reach the certificates."""
    from hal.secure_dir import DirStore

    return DirStore(config.paths.state_dir, group=identity_group(config))


def storage(config: Config | None = None) -> Storage:
    """The disk; for a config with `paths.identity_group`, sharing certificates with it."""
    from hal.disk import FileStorage

    return FileStorage(group=None if config is None else identity_group(config))


def lock() -> Lock:
    from hal.disk import FlockLock

    return FlockLock()


def identity_store(config: Config) -> IdentityStore:
    from agent.identity import IdentityStore

    return IdentityStore(
        state_dir=config.paths.state_dir,
        storage=storage(config),
        lock=lock(),
        generations_kept=config.est.generations_kept,
    )


def pending_store(config: Config) -> PendingStore:
    from agent.est.pending import PendingStore
    from agent.layout import PENDING_FILE_NAME

    return PendingStore(
        path=config.paths.state_dir / PENDING_FILE_NAME, group=identity_group(config)
    )


def memory_store(config: Config) -> MemoryStore:
    """What the agent remembers of its EST server (Basic demanded, csrattrs, its CA set)."""
    from agent.est.memory import MemoryStore

    return MemoryStore(state_dir=config.paths.state_dir, storage=storage(config))


def https_transport_factory(
    config: Config, *, interrupt: Interrupt | None = None
) -> TransportFactory:
    """HTTPS to `est.url` with the configured limits, trusting the anchor it is given; a
    request in progress ends at once when `interrupt` trips (the service's stop)."""
    from agent.est.transport import HttpsTransport, Transport

    est = config.est

    def factory(anchor: Path | None) -> Transport:
        return HttpsTransport(
            url=est.url,
            ca_file=anchor,
            min_tls_version=config.tls.min_version,
            connect_timeout_seconds=est.connect_timeout_seconds,
            read_timeout_seconds=est.read_timeout_seconds,
            max_response_bytes=est.max_response_bytes,
            interrupt=interrupt,
        )

    return factory


def provider_tls_setup(config: Config) -> Callable[[Path], None]:
    """Before TLS with a TPM client key, load the tpm2 OpenSSL provider into this process."""

    def setup(key_file: Path) -> None:
        from agent.tls import is_tpm_key_file

        if is_tpm_key_file(key_file):  # an IDevID may be in the TPM even with software keys
            load_provider(config)

    return setup


def enroller(config: Config, **overrides: Any) -> Enroller:
    """The enroller for the CLI (and the daemon): the configured key store, the disk, HTTPS,
    the Basic credentials, the system clock. `overrides` replace any of them by name (tests)."""
    from agent.clock import SystemClock
    from agent.enroll import check_est_config
    from agent.est.auth import load_basic_credentials

    check_est_config(config)  # before anything is built from it
    parts: dict[str, Any] = dict(overrides)
    builders: dict[str, Callable[[], Any]] = {
        "key_store": lambda: key_store(config),
        "clock": SystemClock,
        "store": lambda: identity_store(config),
        "pending": lambda: pending_store(config),
        "memory": lambda: memory_store(config),
        "transport_factory": lambda: https_transport_factory(config),
        "tls_setup": lambda: provider_tls_setup(config),
        "credentials": lambda: load_basic_credentials(
            config.est.username, config.est.password_file
        ),
        "prove_rotation": lambda: False,  # the daemon proves every rotation (agent/daemon.py)
        "more_proofs": tuple,
        "audit": lambda: service_audit_log(config),
    }
    unknown = set(parts) - set(builders)
    if unknown:
        raise TypeError(f"enroller(): unknown collaborators {sorted(unknown)}")
    for name, build in builders.items():
        if name not in parts:
            parts[name] = build()
    from agent.audit_enroll import AuditedEnroller

    return AuditedEnroller(config=config, **parts)


# -- audit trail -------------------------------------------------------------------------------


def service_audit_log(config: Config, *, clock: Clock | None = None) -> AuditLog:
    """The service's audit trail, `paths.state_dir/audit.jsonl`."""

    return _audit_log(config, state_dir_store(config), clock)


def firmware_audit_log(config: Config, *, clock: Clock | None = None) -> AuditLog:
    """Root's audit trail of firmware events, in root's own `firmware.state_dir` (never in the
    service's directory, which the service user could rewrite: docs/security.md)."""
    from hal.secure_dir import DirStore

    return _audit_log(config, DirStore(config.firmware.state_dir), clock)


def _audit_log(config: Config, store: AppendStore, clock: Clock | None) -> AuditLog:
    from agent.audit_log import AuditLog
    from agent.clock import SystemClock

    return AuditLog(
        store=store,
        clock=clock or SystemClock(),
        max_bytes=config.audit.max_bytes,
        keep_files=config.audit.keep_files,
    )


# -- firmware ----------------------------------------------------------------------------------


def trust_policy(config: Config) -> TrustPolicy:
    # Imported here: only verify and install need X.509 (status, commit, rollback start faster).
    from agent.firmware.chain import TrustPolicy
    from agent.firmware.pem import load_certificates, load_crl

    fw = config.firmware
    return TrustPolicy(
        anchors=tuple(load_certificates(fw.trust_anchors)),
        crls=(*(load_crl(path) for path in fw.crl_files), *stored_crls(config)),
        required_signers=fw.required_signers,
    )


def crl_store(config: Config) -> FileStore:
    """`firmware.crl_dir`: the CRLs `crl refresh` fetched and checked (root's)."""
    from hal.secure_dir import DirStore

    return DirStore(config.firmware.crl_dir)


def stored_crls(config: Config) -> list[NamedCrl]:
    """The CRLs `crl refresh` stored, for the verifier (which refuses a stale one)."""
    from agent.errors import StorageError
    from agent.firmware.chain import NamedCrl
    from agent.firmware.crl import MAX_CRL_BYTES, SUFFIX, parse_crl
    from hal.secure_dir import DirStore

    store = DirStore(config.firmware.crl_dir)
    out = []
    for name in store.names():
        if not name.endswith(SUFFIX) or name.startswith("."):
            continue
        data = store.read(name, limit=MAX_CRL_BYTES)
        if data is None:
            continue
        where = str(store.path(name))
        try:
            out.append(NamedCrl(source=where, crl=parse_crl(data, where)))
        except Exception as e:
            raise StorageError(f"{where}: {e}; run `devid-agent firmware crl refresh`") from e
    return out


def crl_refresh(config: Config, *, clock: Clock | None = None) -> list[CrlOutcome]:
    """`firmware crl refresh`: the anchors' and CRL issuers' distribution points, then
    `firmware.crl_urls`, fetched with requests, judged, stored in `firmware.crl_dir`."""
    from agent.clock import SystemClock
    from agent.firmware import crl
    from agent.firmware.fetch import fetch_bytes, shown
    from agent.firmware.pem import load_certificates

    check_firmware_root_paths(config)
    fw = config.firmware
    now = (clock or SystemClock()).now
    anchors = load_certificates(fw.trust_anchors)
    extra = load_certificates(fw.crl_issuers) if fw.crl_issuers is not None else []
    issuers = crl.checked_issuers(
        anchors, extra, now(), f"{config.source}: firmware.crl_issuers = {str(fw.crl_issuers)!r}"
    )
    urls = crl.distribution_points(issuers)
    urls += [u for u in fw.crl_urls if u not in urls]
    if not urls:
        raise ConfigError(
            f"{config.source}: no CRL to refresh: the certificates in firmware.trust_anchors and "
            "firmware.crl_issuers name no CRL distribution point, and firmware.crl_urls is empty"
        )
    settings = download_settings(config)
    return crl.refresh(
        urls,
        issuers=issuers,
        store=crl_store(config),
        fetch=lambda url, limit: fetch_bytes(url, limit, settings),
        now=now,
        shown=shown,
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


def firmware_state_store(config: Config) -> FileStore:
    """Root's firmware state directory (records, lock, counter files), reached safely."""
    from hal.secure_dir import DirStore

    return DirStore(config.firmware.state_dir)


def firmware_snapshot_store(config: Config) -> FileStore | None:
    """Where root leaves a world-readable copy of `firmware status` for the service."""
    from hal.secure_dir import DirStore

    path = config.firmware.status_snapshot
    return None if path is None else DirStore(path.parent, private=False)


def counter(config: Config) -> MonotonicCounter:
    fw = config.firmware
    if fw.counter is CounterKind.TPM:
        from hal.tpm_counter import TpmCounter

        auth = b""
        if fw.counter_owner_auth_file is not None:
            auth = storage().read_bytes(fw.counter_owner_auth_file, limit=1024).rstrip(b"\n")
        return TpmCounter(
            tcti=config.tpm.tcti,
            index=fw.counter_nv_index,
            store=firmware_state_store(config),
            owner_auth=auth,
        )
    from hal.file_counter import FileCounter

    return FileCounter(store=firmware_state_store(config))


def firmware_device(config: Config, *, clock: Clock | None = None) -> FirmwareDevice:
    from agent.audit_firmware import AuditedFirmwareDevice
    from agent.clock import SystemClock
    from hal.slots import DeviceSlot, booted_slot

    fw = config.firmware
    if not fw.compatible:
        raise ConfigError(f"{config.source}: firmware.compatible: not set (firmware is off)")
    check_firmware_root_paths(config)
    slots = {
        "A": DeviceSlot(name="A", path=fw.slot_a),
        "B": DeviceSlot(name="B", path=fw.slot_b),
    }
    cmdline: Path = fw.cmdline
    return AuditedFirmwareDevice(
        audit=firmware_audit_log(config, clock=clock),
        boot=boot_control(config),
        slots=slots,
        counter=counter(config),
        store=firmware_state_store(config),
        snapshot=firmware_snapshot_store(config),
        booted_slot=lambda: booted_slot(cmdline, fw.cmdline_key),
        clock=clock or SystemClock(),
        compatible=fw.compatible,
        trust=lambda: trust_policy(config),
        boot_tries=fw.boot_tries,
        check_slot_at_commit=fw.check_slot_at_commit,
        buffer_bytes=fw.buffer_kib * 1024,
    )


def download_settings(config: Config) -> DownloadSettings:
    from agent.firmware.fetch import DownloadSettings

    fw = config.firmware
    return DownloadSettings(
        ca=fw.download_ca,
        connect_timeout_seconds=fw.download_connect_timeout_seconds,
        read_timeout_seconds=fw.download_read_timeout_seconds,
    )


def bundle_opener(config: Config) -> BundleOpener:
    """`install|verify https://...`: the bundle streamed over HTTPS (requests), never on disk."""
    from agent.firmware.fetch import bundle_opener as opener

    return opener(download_settings(config))


def check_host(config: Config) -> None:
    """What `config check` (and doctor's config check) asks of this machine beyond the file:
    the identity and control readers groups exist; as root, no firmware path another user
    could replace."""
    identity_group(config)
    if config.control.enabled and config.control.readers_group:
        control_readers_gid(config)
    if config.firmware.compatible:
        check_firmware_root_paths(config)


def check_firmware_root_paths(config: Config) -> None:
    """As root, refuse firmware paths another user could replace (docs/security.md)."""
    import os

    from agent.firmware.root_paths import check_root_paths
    from hal.secure_dir import untrusted_ancestor

    if os.geteuid() == 0:
        check_root_paths(config, untrusted_ancestor)


MAX_SNAPSHOT_BYTES = 256 * 1024


def _firmware_status_as_root(config: Config) -> FirmwareStatus:
    """What `firmware_device(config).status()` says, read without building the device: no
    install, verify or audit machinery (and none of hashlib) is imported to read a status."""
    from agent.firmware.state import MAX_STATE_BYTES, parse_state
    from agent.firmware.status import STATE_FILE, status_of
    from hal.slots import booted_slot

    fw = config.firmware
    if not fw.compatible:
        raise ConfigError(f"{config.source}: firmware.compatible: not set (firmware is off)")
    check_firmware_root_paths(config)
    boot = boot_control(config)
    store = firmware_state_store(config)
    booted = booted_slot(fw.cmdline, fw.cmdline_key)
    return status_of(
        booted=booted,
        boot_state=boot.state(),
        bootloader=boot.kind,
        state=parse_state(store.read(STATE_FILE, limit=MAX_STATE_BYTES), store.path(STATE_FILE)),
        slot_paths={"A": str(fw.slot_a), "B": str(fw.slot_b)},
        counter=counter(config),
    )


def firmware_status(config: Config) -> FirmwareStatus:
    """As root, from root's own state; as anyone else (the service), from the snapshot root
    leaves after every firmware command: never from root's files, which it cannot vouch for."""
    import os

    from agent.errors import StorageError

    if os.geteuid() == 0:
        return _firmware_status_as_root(config)
    path = config.firmware.status_snapshot
    if path is None:
        raise StorageError(
            "firmware status needs root here: firmware.status_snapshot is off, so root leaves "
            "no copy for other users"
        )
    store = firmware_snapshot_store(config)
    assert store is not None
    data = store.read(path.name, limit=MAX_SNAPSHOT_BYTES)
    if data is None:
        raise StorageError(
            f"no firmware status snapshot at {path} yet: root writes it at its next firmware "
            "install, commit (every boot, by the mark-good service) or rollback"
        )
    return _firmware_status_json(data, f"firmware status snapshot {path}", str(path))


def _firmware_status_json(data: bytes, what: str, where: str) -> FirmwareStatus:
    """A FirmwareStatus from its JSON (`to_dict`): the snapshot, or the service's last seen."""
    import json

    from agent.errors import StorageError
    from agent.firmware.status import FirmwareStatus

    try:
        table = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise StorageError(f"{what} is not JSON: {e}") from e
    return FirmwareStatus.from_dict(table, where=where)


# -- status --------------------------------------------------------------------------------------


def status_collector(
    config: Config,
    *,
    clock: Clock | None = None,
    key_check: bool = True,
    checker: Callable[[Identity], None] | None = None,
) -> StatusCollector:
    from datetime import timedelta

    from agent.clock import SystemClock
    from agent.status import StatusCollector

    return StatusCollector(
        device_id=config.device.id,
        config_source=str(config.source),
        identities=identity_store(config),
        pending=pending_store(config),
        firmware=(lambda: firmware_status(config)) if config.firmware.compatible else None,
        clock=clock or SystemClock(),
        skew=timedelta(seconds=config.est.clock_skew_seconds),
        key_check=(checker or identity_key_check(config)) if key_check else None,
        trust=(lambda: est_trust_status(config)) if config.est.url else None,
    )


def est_trust_anchor_file(config: Config) -> Path | None:
    """The explicit anchor file (est.trust_anchor, else the one a bootstrap stored), or None."""
    from agent.layout import EST_ANCHOR_FILE_NAME

    if config.est.trust_anchor is not None:
        return config.est.trust_anchor
    stored = config.paths.state_dir / EST_ANCHOR_FILE_NAME
    return stored if stored.is_file() else None


def est_trust_status(config: Config) -> TrustStatus:
    """The explicit anchor's and the stored CA set's expiries (no EST code imported)."""
    from cryptography import x509

    from agent.errors import StorageError
    from agent.status import trust_status

    def certs(path: Path | None) -> list[x509.Certificate]:
        if path is None or not path.exists():
            return []
        try:
            return x509.load_pem_x509_certificates(storage().read_bytes(path, limit=1024 * 1024))
        except ValueError as e:
            raise StorageError(f"{path}: not PEM certificates: {e}") from e

    anchor = est_trust_anchor_file(config)
    return trust_status(
        str(anchor or ""), certs(anchor), certs(identity_store(config).cacerts_file)
    )


def identity_key_check(config: Config) -> Callable[[Identity], None]:
    """Raise KeyStoreError unless the identity's key loads, signs, and is its certificate's."""

    def check(identity: Identity) -> None:
        from agent.errors import KeyStoreError
        from agent.pki import signs_for

        blob = identity_store(config).key_blob(identity)
        with key_store(config, tpm=identity.key_in_tpm).signer(blob) as key:
            if not signs_for(key, identity.certificate.public_key()):
                raise KeyStoreError(
                    f"{identity.key_file} does not sign for {identity.cert_file}: it is not the "
                    "certificate's key"
                )

    return check


# -- metrics -------------------------------------------------------------------------------------


def renewal_facts(config: Config) -> RenewalFacts | None:
    """What the scheduler's state file says (None: no file yet, or unreadable)."""
    from agent.errors import AgentError
    from agent.metrics import RenewalFacts
    from agent.renewal_state import SchedulerStateStore

    try:
        state = SchedulerStateStore(store=state_dir_store(config)).load()
    except AgentError:
        return None
    return RenewalFacts(
        last_success=state.last_success,
        last_attempt=state.history.last_attempt,
        consecutive_failures=state.history.failures,
    )


def write_metrics(config: Config, *, clock: Clock | None = None) -> Path | None:
    """Render the metrics and replace `metrics.textfile` (0644) atomically; None when off."""
    from agent.clock import SystemClock
    from agent.metrics import render
    from hal.textfile import write_public

    path = config.metrics.textfile
    if path is None:
        return None
    clock = clock or SystemClock()
    status = status_collector(config, clock=clock).collect()
    write_public(path, render(status, renewal_facts(config), clock.now()).encode())
    return path


# -- the TPM, for doctor -----------------------------------------------------------------------


def describe_tpm(config: Config) -> dict[str, str]:
    from hal.tpm import describe_tpm as describe

    return describe(config.tpm.tcti)


def tpm_objects(config: Config) -> tuple[int, int]:
    """(transient objects loaded now, the TPM's guaranteed slots)."""
    from hal.tpm import transient_objects

    return transient_objects(config.tpm.tcti)


def tpm_object_memory_hint() -> str:
    from hal.tpm import OBJECT_MEMORY_HINT

    return OBJECT_MEMORY_HINT


def tpm_owner_auth_set(config: Config) -> bool:
    from hal.tpm import owner_auth_set

    return owner_auth_set(config.tpm.tcti)


# -- the service --------------------------------------------------------------------------------


def renewal_policy(config: Config) -> RenewalPolicy:
    from agent.renewal import RenewalPolicy

    r = config.renewal
    return RenewalPolicy(
        window_start_fraction=r.window_start_fraction,
        window_end_fraction=r.window_end_fraction,
        retry_min_seconds=r.retry_min_seconds,
        retry_max_seconds=r.retry_max_seconds,
        max_wait_share_of_time_left=r.max_wait_share_of_time_left,
    )


def scheduler_state_store(config: Config) -> SchedulerStateStore:
    from agent.renewal_state import SchedulerStateStore

    return SchedulerStateStore(store=state_dir_store(config))


def daemon_parts(config: Config, *, interrupt: Interrupt | None = None) -> DaemonParts:
    """The service's parts. Attempts run in a process of their own (agent/attempt_process.py):
    this long-lived one never imports the TPM stack or the enrollment code."""
    from agent.attempt_process import AttemptProcess
    from agent.daemon import DaemonParts

    est = config.est
    channel = mqtt_channel(config) if config.mqtt.enabled else None
    attempts = AttemptProcess(
        config=config,
        identities=identity_store(config),
        broker_connected=lambda: channel is not None and bool(channel.status().get("connected")),
        interrupt=interrupt,
        faults=faults,
    )
    components: list[Component] = [
        ca_refresher(config, ca_source(config, fetch=attempts.fetch_cacerts)),
        *metrics_writers(config),
    ]
    if config.control.enabled:
        components.append(control_server(config, check_key=attempts.check_key))
    if channel is not None:
        components.append(channel)
    if config.firmware.compatible:
        components.append(firmware_watch(config))
    return DaemonParts(
        config=config,
        enroller=attempts,
        identities=identity_store(config),
        policy=renewal_policy(config),
        bootstrap_available=bool(est.username) or est.idevid_cert is not None,
        components=tuple(components),
    )


def crash_points_passed() -> int:
    """The tests' crash points this process passed (hal/faults.py), for its service."""
    return faults.passed()


def attempt_enroller(
    config: Config, *, interrupt: Interrupt | None, broker_connected: bool
) -> Enroller:
    """The enroller of the service's attempt process (agent/attempt_worker.py): every rotation
    proven over mutual TLS to the EST server, and to the MQTT broker while the service's channel
    is connected; a request in progress ends when the service stops."""
    proofs = (broker_proof(config, lambda: broker_connected),) if config.mqtt.enabled else ()
    return enroller(
        config,
        prove_rotation=True,
        transport_factory=https_transport_factory(config, interrupt=interrupt),
        more_proofs=proofs,
    )


#: how often the service looks at the firmware status snapshot root leaves
FIRMWARE_WATCH_SECONDS = 30.0
#: the service's copy of the last firmware status it saw (in paths.state_dir)
FIRMWARE_SEEN_FILE = "firmware-seen.json"


def firmware_watch(config: Config, *, clock: Clock | None = None) -> Component:
    """Firmware installs, commits and rollbacks as events (agent/firmware_watch.py)."""
    import json

    from agent.clock import SystemClock
    from agent.firmware_watch import FirmwareWatch

    store = state_dir_store(config)

    def recall() -> FirmwareStatus | None:
        data = store.read(FIRMWARE_SEEN_FILE, limit=MAX_SNAPSHOT_BYTES)
        if data is None:
            return None
        where = str(config.paths.state_dir / FIRMWARE_SEEN_FILE)
        return _firmware_status_json(data, f"the firmware status last seen, {where},", where)

    def remember(status: FirmwareStatus) -> None:
        store.write(FIRMWARE_SEEN_FILE, json.dumps(status.to_dict(), sort_keys=True).encode())

    return FirmwareWatch(
        read=lambda: firmware_status(config),
        recall=recall,
        remember=remember,
        clock=clock or SystemClock(),
        interval_seconds=FIRMWARE_WATCH_SECONDS,
    )


def ca_source(
    config: Config,
    *,
    fetch: Callable[[Path], list[x509.Certificate]] | None = None,
    interrupt: Interrupt | None = None,
) -> EstCaSource:
    """The EST CA set for the refresh: the enrollment's anchor, store, memory and lock; /cacerts
    by `fetch` (the service's attempt process), else over HTTPS here with the enrollment's
    limits, a request in progress ending when `interrupt` trips."""
    from agent.est.ca_source import EstCaSource

    return EstCaSource(
        config=config,
        store=identity_store(config),
        memory=memory_store(config),
        fetch=fetch or _cacerts_over_https(config, interrupt),
    )


def _cacerts_over_https(
    config: Config, interrupt: Interrupt | None
) -> Callable[[Path], list[x509.Certificate]]:
    from urllib.parse import urlsplit

    from agent.clock import SystemClock
    from agent.est.auth import load_basic_credentials
    from agent.est.client import EstClient

    est = config.est
    transports = https_transport_factory(config, interrupt=interrupt)
    credentials = load_basic_credentials(est.username, est.password_file)

    def fetch(anchor: Path) -> list[x509.Certificate]:
        client = EstClient(
            transport=transports(anchor),
            prefix=urlsplit(est.url).path.rstrip("/"),
            label=est.label,
            credentials=credentials,
            send_credentials_upfront=est.send_credentials_upfront,
            clock=SystemClock(),
        )
        return client.cacerts()

    return fetch


def ca_refresher(config: Config, source: CaSource) -> Component:
    """The scheduled /cacerts refresh (agent/ca_service.py)."""
    from datetime import timedelta

    from agent.ca_refresh import RefreshPolicy
    from agent.ca_service import CaRefresher
    from agent.clock import SystemClock
    from agent.firmware.pem import load_certificates

    interval = config.est.cacerts_refresh_seconds
    return CaRefresher(
        source=source,
        policy=RefreshPolicy(
            interval_seconds=interval,
            retry_min_seconds=config.renewal.retry_min_seconds,
            retry_max_seconds=config.renewal.retry_max_seconds,
        ),
        device_id=config.device.id,
        clock=SystemClock(),
        skew=timedelta(seconds=config.est.clock_skew_seconds),
        audit=service_audit_log(config),
        load_anchors=load_certificates,
    )


def metrics_writers(config: Config) -> tuple[Component, ...]:
    """The service's metrics textfile writer (agent/metrics_service.py), when metrics are on."""
    from agent.clock import SystemClock
    from agent.metrics_service import MetricsWriter
    from hal.textfile import write_public

    path = config.metrics.textfile
    if path is None:
        return ()
    clock = SystemClock()
    # no key check: loading the key every minute would spend TPM object slots for nothing
    collector = status_collector(config, clock=clock, key_check=False)
    return (
        MetricsWriter(
            path=path,
            interval_seconds=config.metrics.interval_seconds,
            collect=collector.collect,
            write=write_public,
            clock=clock,
        ),
    )


# -- the control socket (agent/control/) ------------------------------------------------------


def control_readers_gid(config: Config) -> int | None:
    """The gid of `control.readers_group` (None when unset), or one-line ConfigError."""
    return _group_gid(config, "control.readers_group", config.control.readers_group)


@contextlib.contextmanager
def _checked_dir_fd(path: Path) -> Iterator[int]:
    """`path` (made 0755 if missing) reached by the checked walk; its descriptor."""
    from hal.secure_dir import SecureDir

    directory = SecureDir.open(path, create=True, private=False)
    assert directory is not None  # create=True
    with directory:
        yield directory.fd


#: `status` over the socket collects the disk parts (and checks the key) at most this often
STATUS_CACHE_SECONDS = 1.0


def control_status_answer(
    config: Config,
    *,
    check_key: Callable[[Identity], None] | None = None,
    clock: Clock | None = None,
) -> Callable[[Snapshot], dict[str, Any]]:
    """What the daemon answers `status` with: the model `status` prints (the disk parts collected
    here, the key checked by `check_key`, with the service's snapshot), its text, and its exit
    code."""
    from dataclasses import replace

    from agent.clock import SystemClock
    from agent.metrics import RenewalFacts
    from agent.status import service_status
    from agent.status_codes import status_code

    clock = clock or SystemClock()
    collector = status_collector(config, clock=clock, checker=check_key)
    cache: list[tuple[float, int | None, AgentStatus]] = []

    def answer(snapshot: Snapshot) -> dict[str, Any]:
        generation = snapshot.identity.generation if snapshot.identity else None
        mono = clock.monotonic()
        if cache and mono - cache[0][0] < STATUS_CACHE_SECONDS and cache[0][1] == generation:
            disk = cache[0][2]
        else:
            disk = collector.collect()
            cache[:] = [(mono, generation, disk)]
        status = replace(disk, service=service_status(snapshot))
        facts = RenewalFacts(
            last_success=snapshot.last_success,
            last_attempt=snapshot.last_attempt,
            consecutive_failures=snapshot.consecutive_failures,
        )
        code = status_code(status, facts, failing_share=config.status.renewal_failing_share)
        return {"status": status.to_dict(), "text": status.to_text(), "code": code}

    return answer


def control_server(
    config: Config,
    *,
    check_key: Callable[[Identity], None] | None = None,
    clock: Clock | None = None,
) -> Component:
    import os

    from agent.clock import SystemClock
    from agent.control.permission import Policy
    from agent.control.server import ControlServer

    readers = control_readers_gid(config)
    clock = clock or SystemClock()
    return ControlServer(
        run_dir=config.paths.run_dir,
        open_run_dir=lambda: _checked_dir_fd(config.paths.run_dir),
        policy=Policy(service_uid=os.geteuid(), readers_gid=readers),
        group=readers if readers is not None else os.getegid(),
        status=control_status_answer(config, check_key=check_key, clock=clock),
        audit=service_audit_log(config, clock=clock),
        request_timeout_seconds=config.control.request_timeout_seconds,
        max_clients=config.control.max_clients,
        clock=clock,
    )


# -- the MQTT device channel (agent/mqtt/) ------------------------------------------------------


def mqtt_context(config: Config) -> Callable[[Identity], ssl.SSLContext]:
    """TLS contexts for the channel: the broker checked against `mqtt.ca_file` (hostname
    included), TLS >= tls.min_version, the identity's full chain and key (TPM keys through the
    provider, loaded here first)."""

    def context_for(identity: Identity) -> ssl.SSLContext:
        from agent.tls import client_context

        if identity.key_in_tpm:
            load_provider(config)
        assert config.mqtt.ca_file is not None  # checked with the config
        fullchain = identity.directory / "fullchain.pem"
        return client_context(
            ca_file=config.mqtt.ca_file,
            cert_file=fullchain if fullchain.exists() else identity.cert_file,
            key_file=identity.key_file,
            min_version=config.tls.min_version,
        )

    return context_for


def mqtt_status_document(
    config: Config, snapshot: Callable[[], Snapshot | None]
) -> Callable[[], dict[str, Any]]:
    """What the status topic carries: the model `status` prints (without the key check, which
    would sign with the TPM at every publish), its `service` part from the daemon's snapshot."""
    from dataclasses import replace

    from agent.status import service_status

    collector = status_collector(config, key_check=False)

    def document() -> dict[str, Any]:
        status = collector.collect()
        shot = snapshot()
        if shot is not None:
            status = replace(status, service=service_status(shot))
        return status.to_dict()

    return document


def mqtt_command_verifier(config: Config) -> CommandVerifier:
    """The signed-command check (agent/commands/, docs/commands.md): signers chaining to
    `mqtt.command_trust_anchor`, ids remembered in the state directory's replay memory. With no
    anchor and no `insecure_unsigned_commands`, every command is refused (`not_configured`)."""
    from agent.commands import (
        CommandLimits,
        CommandRefused,
        ReplayMemory,
        parse_anchors,
        verify_command,
    )
    from agent.errors import StorageError
    from agent.mqtt.commands import Accepted, Refused, refuse_all

    m = config.mqtt
    if m.command_trust_anchor is None and not m.insecure_unsigned_commands:
        return refuse_all
    anchors: tuple[Any, ...] = ()
    if m.command_trust_anchor is not None:
        where = f"{config.source}: mqtt.command_trust_anchor = {str(m.command_trust_anchor)!r}"
        try:
            data = storage().read_bytes(m.command_trust_anchor, limit=1024 * 1024)
        except (OSError, StorageError) as e:
            raise ConfigError(f"{where}: cannot be read: {e}") from e
        anchors = parse_anchors(data, where)
    if m.insecure_unsigned_commands:
        logging.getLogger(__name__).warning(
            "INSECURE: mqtt.insecure_unsigned_commands is on: commands without a signature are "
            "accepted (labs only; each one is warned about again)"
        )
    replay = ReplayMemory(store=state_dir_store(config))  # keeps a shared state_dir shared
    limits = CommandLimits(max_envelope_bytes=min(m.max_payload_bytes, 64 * 1024))

    def verify(raw: bytes, now: datetime) -> Accepted | Refused:
        try:
            command = verify_command(
                raw,
                device_id=config.device.id,
                anchors=anchors,
                now=now,
                replay=replay,
                limits=limits,
                insecure_unsigned=m.insecure_unsigned_commands,
            )
        except CommandRefused as e:
            return Refused(e.code, e.detail, e.command_id, security=e.security)
        return Accepted(command.id, command.command, dict(command.args), command.unsigned)

    return verify


def broker_proof(config: Config, connected: Callable[[], bool]) -> Callable[[Identity], None]:
    """Verified rotation, the broker's part: while the channel is connected (the broker takes
    the current identity), the new one must be taken too, or the rotation is refused and the
    old identity stays. A broker that is down, or that refuses the current identity as well,
    does not hold a rotation back: the EST proof alone decides then (it would be no better)."""
    from agent.clock import SystemClock
    from agent.errors import TrustError
    from agent.mqtt.channel import parse_broker
    from agent.mqtt.probe import probe_in_order

    m = config.mqtt
    brokers = [parse_broker(url) for url in m.brokers]
    make_context = mqtt_context(config)
    log = logging.getLogger("agent.mqtt")
    clock = SystemClock()

    def prove(identity: Identity) -> None:
        if not connected():
            log.info("mqtt: not connected, so the broker's proof of the new identity is skipped")
            return
        import gc

        def context() -> ssl.SSLContext:
            gc.collect()  # the last context (a TPM object) is gone before this one is made
            return make_context(identity)

        broker, result = probe_in_order(
            brokers, context, client_id=m.client_id or config.device.id, protocol=m.protocol,
            timeout=m.connect_timeout_seconds, clock=clock,
        )  # fmt: skip
        if result.outcome == "accepted":
            log.info("mqtt: %s takes identity generation %d (%s)", broker,
                     identity.generation, result.detail)  # fmt: skip
        elif result.outcome == "rejected":
            raise TrustError(  # a security event: retried at the slow pace, the old one kept
                f"the MQTT broker {broker} refuses the new identity (generation "
                f"{identity.generation}) while it takes the current one: {result.detail}"
            )
        else:
            log.warning("mqtt: no broker reachable to prove the new identity to (%s): the EST "
                        "proof decides", result.detail)  # fmt: skip

    return prove


def mqtt_channel(config: Config, *, clock: Clock | None = None) -> MqttChannel:
    from agent.clock import SystemClock
    from agent.mqtt.channel import ChannelSettings, MqttChannel, parse_broker
    from agent.mqtt.topics import Topics

    m = config.mqtt
    bare_tpm = config.keys.store is KeyStoreKind.TPM and not config.tpm.tcti.startswith(
        "device:/dev/tpmrm"
    )
    settings = ChannelSettings(
        brokers=[parse_broker(url) for url in m.brokers],
        topics=Topics(m.topic_prefix, config.device.id),
        client_id=m.client_id or config.device.id,
        keepalive_seconds=m.keepalive_seconds,
        reconnect_min_seconds=m.reconnect_min_seconds,
        reconnect_max_seconds=m.reconnect_max_seconds,
        qos=m.qos,
        protocol=m.protocol,
        status_interval_seconds=m.status_interval_seconds,
        max_payload_bytes=m.max_payload_bytes,
        session_expiry_seconds=m.session_expiry_seconds,
        offline_queue_events=m.offline_queue_events,
        connect_timeout_seconds=m.connect_timeout_seconds,
        # proof-of-possession over TLS 1.2 signs inside the EST connection: EST context 1 +
        # signer 2 leave no slot for ours on a TPM without a resource manager (docs/tpm.md);
        # with TLS 1.3 only there is no tls-unique, so no proof-of-possession to make room for
        release_for_attempts=bare_tpm
        and config.est.proof_of_possession is not ProofOfPossession.NEVER
        and config.tls.min_version == "1.2",
        # the loop goes on while an attempt's process works: no new TPM object beside it
        hold_during_attempts=bare_tpm,
    )

    def snapshot() -> Snapshot | None:
        host = channel.host
        try:
            return None if host is None else host.snapshot()
        except RuntimeError:  # before the daemon's first turn
            return None

    channel = MqttChannel(
        settings=settings,
        identities=identity_store(config),
        context_for=mqtt_context(config),
        status_document=mqtt_status_document(config, snapshot),
        verifier=mqtt_command_verifier(config),
        clock=clock or SystemClock(),
    )
    return channel


def build_time() -> datetime:
    """When this software was installed (its package's files' mtime): the clock floor's base.
    A device whose clock reads earlier has no trustworthy clock (agent/renewal.py)."""
    from datetime import datetime, timezone

    import agent

    return datetime.fromtimestamp(Path(agent.__file__).stat().st_mtime, timezone.utc)


def service_clock() -> Clock:
    """The system clock; under test, moved as hal.faults' clock offset file says (a device
    booting at 1970, then set)."""
    from agent.clock import ShiftedClock, SystemClock

    path = faults.clock_offset_file()
    if path is None:
        return SystemClock()
    logging.getLogger(__name__).warning(
        "test clock: the service's time is moved by the seconds in %s", path
    )
    return ShiftedClock(lambda: faults.clock_offset(path))


def daemon(config: Config, *, load: Callable[[], Config]) -> Daemon:
    from agent.clock import Interrupt
    from agent.daemon import Daemon
    from hal.systemd import notify, watchdog_interval

    first = [config]

    def load_once_then_reload() -> Config:  # the first build uses the config already checked
        return first.pop() if first else load()

    interrupt = Interrupt()  # lives as long as the process: SIGTERM trips it, never reset
    return Daemon(
        load_config=load_once_then_reload,
        build=lambda c: daemon_parts(c, interrupt=interrupt),
        state_store=scheduler_state_store,
        clock=service_clock(),
        build_time=build_time(),
        notify=notify,
        watchdog_seconds=watchdog_interval(),
        interrupt=interrupt,
    )


def service_log_handler() -> logging.Handler:
    """stderr, one line per event; with `<N>` priorities when stderr is the journal."""
    from hal.systemd import JournalFormatter, stderr_is_journal

    handler = logging.StreamHandler()
    fmt = "%(name)s: %(message)s"
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter(fmt))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s " + fmt))
    return handler
