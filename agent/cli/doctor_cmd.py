"""`devid-agent doctor`: named checks of everything the agent needs, each saying what to fix.

In the manner of `aziotctl check`: each check reports `ok`, `warning` (works, but weaker or soon
a problem), `error` (something the agent needs is broken) or `fatal` (nothing further can be
checked: the configuration does not load). Text by default, one line per check; `--json` a list
of `{"check", "status", "detail"}`. Exit 1 when any check is an error or fatal (or a warning,
with `--warnings-as-errors`), else 0.

Checks, in order: config (the rules of `config check`), state_dir, identity_files (modes of
every generation: private, or shared with `paths.identity_group` as it allows), est_config,
est_credentials (password file 0600/0400, IDevID files), est_trust_anchor (present, expiry,
and the stored EST CA set's earliest expiry),
est_reachable (a TLS connection to est.url verified against the anchor, short timeout), clock
(against this build's time and the EST server's Date), identity (certificate expiry),
identity_key (the key loads, matches the certificate and signs), key_store (TPM reachable, free
object slots), tpm_owner_auth, tls_provider (tpm2 provider version), bootloader_env,
firmware_anchors (present, expiry), service (running and its control socket answering: a warning
when it does not run, an error when its socket does not answer; ok when control.enabled = false),
mqtt_broker (with [mqtt] brokers: the brokers in order, with the current identity, until one
answers CONNACK; a refusal of our certificate or of the broker's is an error).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.cli import one_line
from agent.cli.config_cmd import add_config_option
from agent.config import Config, CounterKind, KeyStoreKind, config_path, load_config
from agent.errors import AgentError

if TYPE_CHECKING:
    from cryptography import x509

OK, WARNING, ERROR, FATAL = "ok", "warning", "error", "fatal"
#: a certificate (trust anchor, firmware anchor) this close to its end is a warning
EXPIRY_WARNING = timedelta(days=30)
#: an identity with less than this share of its lifetime left is a warning
LIFETIME_WARNING = 0.1
#: the EST probe's connect and read timeout, at most (doctor must answer quickly)
PROBE_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # ok | warning | error | fatal
    detail: str


@dataclass
class Context:
    """What a run of checks shares: the config, the time, and what one check learned for another."""

    config: Config
    now: datetime = field(default_factory=lambda: _system_now())
    #: the EST server's HTTP Date header, when the probe got one
    server_date: datetime | None = None


def _system_now() -> datetime:
    from agent.clock import SystemClock

    return SystemClock().now()


def _when(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _expiry(what: str, cert: x509.Certificate, now: datetime) -> tuple[str, str]:
    end = cert.not_valid_after_utc
    if end < now:
        return ERROR, f"{what} expired at {_when(end)}"
    if cert.not_valid_before_utc > now:
        return ERROR, f"{what} is not valid before {_when(cert.not_valid_before_utc)}"
    if end - now < EXPIRY_WARNING:
        return WARNING, f"{what} expires at {_when(end)}, in {(end - now).days} days"
    return OK, f"{what} valid until {_when(end)}"


def _group_gid(ctx: Context) -> int | None:
    from agent.wiring import identity_group

    return identity_group(ctx.config)


def check_state_dir(ctx: Context) -> Finding:
    path = ctx.config.paths.state_dir
    group = _group_gid(ctx)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Finding("state_dir", WARNING, f"{path} does not exist yet (created at enrollment)")
    except OSError as e:
        return Finding("state_dir", ERROR, f"cannot stat {path}: {e.strerror}")
    if st.st_uid != os.geteuid():  # hal.storage.ensure_private_dir refuses it too
        return Finding(
            "state_dir",
            ERROR,
            f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}); run "
            "devid-agent as its owner, or chown it",
        )
    mode = stat.S_IMODE(st.st_mode)
    problem = mode_problem(mode, st.st_gid, directory=True, shareable=True, group=group)
    if problem is not None:
        return Finding("state_dir", ERROR, f"{path} {problem}")
    return Finding("state_dir", OK, f"{path} ({mode:04o})")


#: what may carry the identity group's read bit: the certificates, never the key
SHAREABLE_FILES = ("cert.pem", "chain.pem", "fullchain.pem")


def mode_problem(
    mode: int, gid: int, *, directory: bool, shareable: bool, group: int | None
) -> str | None:
    """What is wrong with an identity path's mode and group, or None (pure).

    Private is 0700/0600. With `paths.identity_group` (`group`), a directory may be 0750 or 0710
    and a certificate file 0640, each with exactly that group; the key never has a group bit,
    nothing is group-writable, nothing is open to others (hal.secure_dir's rule). A file that is
    not `shareable` (the key, anything but a certificate) is private whatever the group."""
    want = "0700" if directory else "0600"
    if mode & 0o007:
        return f"is open to others (mode {mode:04o}); want {want}"
    if mode & 0o020:
        return f"is writable by its group (mode {mode:04o}); want {want}"
    if not mode & 0o070:
        return None
    if not shareable:
        return f"is readable by its group (mode {mode:04o}); only certificates may be; want 0600"
    if group is None:
        return (
            f"is shared with group {gid} (mode {mode:04o}) but paths.identity_group is unset; "
            f"want {want}"
        )
    if gid != group:
        return (
            f"is shared with group {gid} (mode {mode:04o}), not with paths.identity_group ({group})"
        )
    allowed = (0o750, 0o710) if directory else (0o640,)
    if mode & 0o777 not in allowed:
        shared = " or ".join(f"{m:04o}" for m in allowed)
        return f"is mode {mode:04o}; want {want} or {shared} with paths.identity_group"
    return None


def check_identity_files(ctx: Context) -> Finding:
    """Every generation's directory and files: private, or shared with the identity group as
    `paths.identity_group` allows; warn when the group cannot read the current certificates."""
    group = _group_gid(ctx)
    root = ctx.config.paths.state_dir / "identity"
    try:
        names = sorted(n for n in os.listdir(root) if n.startswith("gen-"))
    except FileNotFoundError:
        return Finding("identity_files", OK, "not enrolled: no identity files")
    except OSError as e:
        return Finding("identity_files", ERROR, f"cannot list {root}: {e.strerror}")
    entries = [(root, True, True)]
    for name in names:
        generation = root / name
        entries.append((generation, True, True))
        try:
            inside = sorted(os.listdir(generation))
        except OSError as e:
            return Finding("identity_files", ERROR, f"cannot list {generation}: {e.strerror}")
        # only the certificates may be shared: the key, a temp file, ... stay private
        entries += [(generation / file, False, file in SHAREABLE_FILES) for file in inside]
    for path, is_dir, shareable in entries:
        try:
            st = os.lstat(path)
        except OSError as e:
            return Finding("identity_files", ERROR, f"cannot stat {path}: {e.strerror}")
        if stat.S_ISLNK(st.st_mode):
            continue
        problem = mode_problem(
            stat.S_IMODE(st.st_mode), st.st_gid, directory=is_dir, shareable=shareable, group=group
        )
        if problem is not None:
            return Finding("identity_files", ERROR, f"{path} {problem}")
    if group is None:
        return Finding("identity_files", OK, f"{len(names)} generation(s), private")
    name = ctx.config.paths.identity_group
    current = root / "current"
    way = [(ctx.config.paths.state_dir, 0o010), (root, 0o010), (current, 0o010)]
    for path, bit in [*way, *((current / f, 0o040) for f in SHAREABLE_FILES)]:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue  # not enrolled, or no `current`: the identity check says so
        except OSError as e:
            return Finding("identity_files", ERROR, f"cannot stat {path}: {e.strerror}")
        if st.st_gid != group or not st.st_mode & bit:
            return Finding(
                "identity_files",
                WARNING,
                f"group {name!r} cannot read the current certificates yet: {path} is not shared "
                "with it; the next generation is (`devid-agent renew`, or the service's rotation)",
            )
    return Finding("identity_files", OK, f"the current certificates are readable by group {name!r}")


def check_est_config(ctx: Context) -> Finding:
    config = ctx.config
    if config.est.url:
        return Finding("est_config", OK, config.est.url)
    # A firmware-only device may do without EST; any other cannot enroll.
    status = WARNING if config.firmware.compatible else ERROR
    return Finding(
        "est_config", status, f"{config.source}: est.url is not set, so `enroll` cannot run"
    )


def check_est_credentials(ctx: Context) -> Finding:
    est = ctx.config.est
    if not est.url:
        return Finding("est_credentials", OK, "EST not configured")
    from agent.est.auth import load_basic_credentials

    said = []
    if est.username:
        load_basic_credentials(est.username, est.password_file)  # ConfigError: one clear line
        said.append(f"HTTP Basic as {est.username!r}, {est.password_file} private")
    for key, path in (("est.idevid_cert", est.idevid_cert), ("est.idevid_key", est.idevid_key)):
        if path is not None and not path.is_file():
            return Finding("est_credentials", ERROR, f"{key}: {path} does not exist")
    if est.idevid_cert is not None:
        said.append(f"IDevID {est.idevid_cert}")
    if not said:
        return Finding(
            "est_credentials",
            WARNING,
            "no HTTP Basic credentials and no IDevID: the EST server must accept an "
            "unauthenticated first enrollment",
        )
    return Finding("est_credentials", OK, "; ".join(said))


def _anchor(ctx: Context) -> Path | None:
    from agent.est.trust import configured_anchor

    est = ctx.config.est
    return configured_anchor(
        trust_anchor=est.trust_anchor,
        state_dir=ctx.config.paths.state_dir,
        fingerprint=est.bootstrap_fingerprint_sha256,
    )


def _load_pem_certs(path: Path) -> list[x509.Certificate]:
    from cryptography import x509

    from agent.errors import ConfigError

    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a PEM certificate file ({e})") from e
    return certs


def check_est_trust_anchor(ctx: Context) -> Finding:
    if not ctx.config.est.url:
        return Finding("est_trust_anchor", OK, "EST not configured")
    anchor = _anchor(ctx)
    if anchor is None:
        return Finding(
            "est_trust_anchor",
            WARNING,
            "no anchor yet: the first enrollment bootstraps it from the configured fingerprint",
        )
    worst, details = OK, []
    for cert in _load_pem_certs(anchor):
        status, detail = _expiry(cert.subject.rfc4514_string(), cert, ctx.now)
        details.append(detail)
        if status == ERROR or (status == WARNING and worst == OK):
            worst = status
    text = f"{anchor}: " + "; ".join(details)
    # the stored EST CA set (validates issued certificates; the CA refresh keeps it current)
    cacerts = ctx.config.paths.state_dir / "cacerts.pem"
    if cacerts.is_file():
        certs = _load_pem_certs(cacerts)
        if certs:
            first = min(certs, key=lambda c: c.not_valid_after_utc)
            what = f"its earliest, {first.subject.rfc4514_string()},"
            status, detail = _expiry(what, first, ctx.now)
            if status == ERROR or (status == WARNING and worst == OK):
                worst = status
            text += f"; {cacerts} ({len(certs)}): {detail}"
    return Finding("est_trust_anchor", worst, text)


def check_est_reachable(ctx: Context) -> Finding:
    est = ctx.config.est
    if not est.url:
        return Finding("est_reachable", OK, "EST not configured")
    import contextlib
    import http.client
    import ssl
    from email.utils import parsedate_to_datetime
    from urllib.parse import urlsplit

    from agent.tls import client_context

    anchor = _anchor(ctx)
    if anchor is None:
        return Finding(
            "est_reachable",
            WARNING,
            f"{est.url}: not probed: there is no anchor to verify it with before the bootstrap",
        )
    parts = urlsplit(est.url)
    host, port = parts.hostname or "", parts.port or 443
    timeout = min(PROBE_TIMEOUT_SECONDS, est.connect_timeout_seconds)
    context = client_context(ca_file=anchor, min_version=ctx.config.tls.min_version)
    label = f"/{est.label}" if est.label else ""
    target = parts.path.rstrip("/") + f"/.well-known/est{label}/cacerts"
    conn = http.client.HTTPSConnection(host, port, context=context, timeout=timeout)
    try:
        conn.request("GET", target, headers={"Connection": "close"})
        response = conn.getresponse()
        date = response.getheader("Date")
        response.read(64 * 1024)
    except ssl.SSLCertVerificationError as e:
        return Finding(
            "est_reachable",
            ERROR,
            f"{est.url}: the server's certificate is not trusted by {anchor}: "
            f"{e.verify_message or e.reason}",
        )
    except ssl.SSLError as e:
        return Finding("est_reachable", ERROR, f"{est.url}: TLS failed: {e.reason or e}")
    except (OSError, http.client.HTTPException) as e:
        why = "timed out" if isinstance(e, TimeoutError) else str(e)
        return Finding("est_reachable", ERROR, f"{est.url}: unreachable: {why}")
    finally:
        conn.close()
    if date:
        with contextlib.suppress(TypeError, ValueError):
            ctx.server_date = parsedate_to_datetime(date).astimezone(timezone.utc)
    return Finding(
        "est_reachable",
        OK,
        f"{est.url}: TLS trusted by {anchor}, /cacerts answered HTTP {response.status}",
    )


def build_time() -> datetime:
    """When this copy of the agent was built (its package's files were written): a clock before
    it is certainly wrong."""
    import agent

    return datetime.fromtimestamp(Path(agent.__file__).stat().st_mtime, tz=timezone.utc)


def check_clock(ctx: Context) -> Finding:
    built = build_time()
    if ctx.now < built - timedelta(days=1):
        return Finding(
            "clock",
            ERROR,
            f"the clock says {_when(ctx.now)}, before this agent was built ({_when(built)}): "
            "certificates will look not yet valid; set the time (NTP, RTC)",
        )
    skew = ctx.config.est.clock_skew_seconds
    if ctx.server_date is not None:
        off = (ctx.now - ctx.server_date).total_seconds()
        if abs(off) > skew:
            return Finding(
                "clock",
                ERROR,
                f"the clock is {off:+.0f} s off the EST server's Date ({_when(ctx.server_date)}), "
                f"more than est.clock_skew_seconds ({skew:g}); set the time (NTP, RTC)",
            )
        return Finding("clock", OK, f"{_when(ctx.now)}, within {abs(off):.0f} s of the EST server")
    return Finding("clock", OK, f"{_when(ctx.now)}, after this build ({_when(built)})")


def _identity(ctx: Context) -> Any:
    from agent.wiring import identity_store

    return identity_store(ctx.config).current()


def check_identity(ctx: Context) -> Finding:
    from agent.validity import State, validity

    identity = _identity(ctx)
    if identity is None:
        return Finding("identity", WARNING, "not enrolled: run `devid-agent enroll`")
    cert = identity.certificate
    skew = timedelta(seconds=ctx.config.est.clock_skew_seconds)
    v = validity(cert, ctx.now, skew)
    where = f"generation {identity.generation} ({identity.cert_file})"
    if v.state is State.EXPIRED:
        return Finding(
            "identity", ERROR, f"{where} expired at {_when(v.not_after)}: run `devid-agent enroll`"
        )
    if v.state is State.NOT_YET_VALID:
        return Finding(
            "identity", ERROR, f"{where} is not valid before {_when(v.not_before)} (clock?)"
        )
    detail = f"{where} valid until {_when(v.not_after)}, {v.lifetime_left:.0%} of its lifetime left"
    if v.lifetime_left < LIFETIME_WARNING:
        return Finding("identity", WARNING, detail + ": renewal is overdue")
    return Finding("identity", OK, detail)


def check_identity_key(ctx: Context) -> Finding:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    from agent.wiring import identity_store, key_store

    store = identity_store(ctx.config)
    identity = store.current()
    if identity is None:
        return Finding("identity_key", OK, "not enrolled: no key to check")
    if identity.key_in_tpm != (ctx.config.keys.store is KeyStoreKind.TPM):
        return Finding(
            "identity_key",
            ERROR,
            f"{identity.key_file} is a {'TPM' if identity.key_in_tpm else 'software'} key but "
            f"keys.store is {ctx.config.keys.store.value!r}",
        )
    keys = key_store(ctx.config)
    blob = store.key_blob(identity)
    cert_key = identity.certificate.public_key()
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if keys.public_key(blob).public_bytes(*spki) != cert_key.public_bytes(*spki):
        return Finding(
            "identity_key",
            ERROR,
            f"{identity.key_file} does not match the certificate {identity.cert_file}",
        )
    data = b"devid-agent doctor"
    try:
        with keys.signer(blob) as key:
            if isinstance(key, ec.EllipticCurvePrivateKey):
                signature = key.sign(data, ec.ECDSA(hashes.SHA256()))
            elif isinstance(key, rsa.RSAPrivateKey):
                signature = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
            else:
                return Finding("identity_key", WARNING, f"cannot test-sign a {type(key).__name__}")
        if isinstance(cert_key, ec.EllipticCurvePublicKey):
            cert_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(cert_key, rsa.RSAPublicKey):
            cert_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    except Exception as e:  # an invalid signature, or a TPM error not wrapped yet
        if isinstance(e, AgentError):
            raise
        return Finding("identity_key", ERROR, f"{identity.key_file}: test signature failed: {e}")
    return Finding(
        "identity_key", OK, f"{identity.key_file} ({keys.kind}) matches the certificate and signs"
    )


def check_key_store(ctx: Context) -> Finding:
    config = ctx.config
    if config.keys.store is KeyStoreKind.SOFTWARE:
        return Finding(
            "key_store", WARNING, "software keys: the private key is a file root can copy"
        )
    from agent.wiring import describe_tpm, tpm_object_memory_hint, tpm_objects

    info = describe_tpm(config)
    loaded, slots = tpm_objects(config)
    about = (
        f"TPM at {config.tpm.tcti}: manufacturer {info['manufacturer']}, "
        f"spec revision {info['revision']}, {loaded} of {slots} object slots in use"
    )
    if loaded + 2 > slots:  # a key load needs two free slots (docs/tpm.md)
        hint = tpm_object_memory_hint()
        return Finding("key_store", ERROR, f"{about}: no key can be loaded{hint}")
    return Finding("key_store", OK, about)


def check_tls_provider(ctx: Context) -> Finding:
    if ctx.config.keys.store is KeyStoreKind.SOFTWARE:
        return Finding("tls_provider", OK, "not needed for software keys")
    from agent.wiring import prepare_tls

    info = prepare_tls(ctx.config)
    assert info is not None
    return Finding("tls_provider", OK, f"tpm2 OpenSSL provider {info.version} at {info.path}")


def check_tpm_owner_auth(ctx: Context) -> Finding:
    config = ctx.config
    uses_tpm = config.keys.store is not KeyStoreKind.SOFTWARE or (
        config.firmware.compatible and config.firmware.counter is CounterKind.TPM
    )
    if not uses_tpm:
        return Finding("tpm_owner_auth", OK, "no TPM in use")
    from agent.wiring import tpm_owner_auth_set

    if tpm_owner_auth_set(config):
        return Finding("tpm_owner_auth", OK, "the TPM owner hierarchy has an auth value")
    return Finding(
        "tpm_owner_auth",
        WARNING,
        "the TPM owner auth is empty: anyone who can open the TPM (group tss) can define and "
        "undefine NV indexes, so could squat the anti-rollback counter's index (refused, but "
        "firmware updates stop) or raise the counter and lock updates out; set one with "
        "`tpm2_changeauth -c owner` and name its file in firmware.counter_owner_auth_file",
    )


def check_bootloader_env(ctx: Context) -> Finding:
    if not ctx.config.firmware.compatible:
        return Finding("bootloader_env", OK, "firmware not configured")
    from agent.wiring import boot_control

    boot = boot_control(ctx.config)
    state = boot.state()
    tries = ", ".join(f"{slot}={n}" for slot, n in sorted(state.tries_left.items()))
    return Finding(
        "bootloader_env",
        OK,
        f"{boot.kind}: order {' '.join(state.order) or '(empty)'}, tries {tries}, "
        f"next boot {state.next_boot() or 'NONE'}",
    )


def check_firmware_anchors(ctx: Context) -> Finding:
    fw = ctx.config.firmware
    if not fw.compatible:
        return Finding("firmware_anchors", OK, "firmware not configured")
    from agent.firmware.pem import load_certificates

    worst, details = OK, []
    for cert in load_certificates(fw.trust_anchors):
        status, detail = _expiry(cert.subject.rfc4514_string(), cert, ctx.now)
        details.append(detail)
        if status == ERROR or (status == WARNING and worst == OK):
            worst = status
    return Finding("firmware_anchors", worst, f"{fw.trust_anchors}: " + "; ".join(details))


#: how long doctor waits for the service's answer to a ping
SERVICE_PROBE_SECONDS = 3.0


def check_service(ctx: Context) -> Finding:
    """The service running and its control socket answering (with control.enabled)."""
    from agent.control import client

    config = ctx.config
    if not config.control.enabled:
        return Finding("service", OK, "control.enabled = false: the service is not expected")
    path = str(config.paths.run_dir / client.SOCKET_NAME)
    try:
        answer = client.ask(
            path,
            "ping",
            timeout=SERVICE_PROBE_SECONDS,
            trusted_uids=client.trusted_server_uids(str(config.paths.state_dir)),
        )
    except client.Unavailable as e:
        if e.state in ("absent", "refused"):
            return Finding(
                "service",
                WARNING,
                f"not running ({e.detail}): `systemctl start devid-agent`; devices that only "
                "enroll once set control.enabled = false",
            )
        if e.state == "forbidden":
            return Finding(
                "service", WARNING, f"{e.detail}: run doctor as root or the service user"
            )
        return Finding("service", ERROR, f"the control socket does not answer: {e.detail}")
    except client.Refused as e:
        return Finding("service", WARNING, f"running, but it refused this user: {e.message}")
    return Finding("service", OK, f"running, {path} answers (version {answer.get('version')})")


def check_mqtt_broker(ctx: Context) -> Finding:
    """A broker takes the current identity: TLS with its key, MQTT CONNECT, CONNACK
    (agent/mqtt/probe.py, with its own client id so the service's session stays)."""
    from agent.clock import SystemClock
    from agent.errors import AgentError
    from agent.mqtt.channel import parse_broker
    from agent.mqtt.probe import probe_in_order
    from agent.wiring import identity_store, mqtt_context

    m = ctx.config.mqtt
    if not m.enabled:
        return Finding("mqtt_broker", OK, "MQTT not configured (no mqtt.brokers)")
    try:
        identity = identity_store(ctx.config).current()
    except AgentError as e:
        return Finding("mqtt_broker", ERROR, f"no identity to connect with: {e}")
    if identity is None:
        return Finding("mqtt_broker", WARNING, "not enrolled: no identity to connect with yet")
    context_for = mqtt_context(ctx.config)
    try:
        broker, result = probe_in_order(
            [parse_broker(url) for url in m.brokers], lambda: context_for(identity),
            client_id=m.client_id or ctx.config.device.id, protocol=m.protocol,
            timeout=min(PROBE_TIMEOUT_SECONDS, m.connect_timeout_seconds), clock=SystemClock(),
        )  # fmt: skip
    except (AgentError, OSError, ValueError) as e:
        why = f"cannot make a TLS context with the identity: {e}"
        return Finding("mqtt_broker", ERROR, why)
    if result.outcome == "accepted":
        return Finding(
            "mqtt_broker",
            OK,
            f"{broker} accepts identity generation {identity.generation} ({result.detail})",
        )
    if result.outcome == "rejected":
        return Finding("mqtt_broker", ERROR, f"{broker}: {result.detail}")
    return Finding("mqtt_broker", ERROR, f"no broker reachable: {result.detail}")


CHECKS: list[Callable[[Context], Finding]] = [
    check_state_dir,
    check_identity_files,
    check_est_config,
    check_est_credentials,
    check_est_trust_anchor,
    check_est_reachable,
    check_clock,
    check_identity,
    check_identity_key,
    check_key_store,
    check_tpm_owner_auth,
    check_tls_provider,
    check_bootloader_env,
    check_firmware_anchors,
    check_service,
    check_mqtt_broker,
]


def run_checks(config: Config, *, now: datetime | None = None) -> list[Finding]:
    ctx = Context(config) if now is None else Context(config, now=now)
    findings = []
    for check in CHECKS:
        name = check.__name__.removeprefix("check_")
        try:
            findings.append(check(ctx))
        except AgentError as e:
            findings.append(Finding(name, ERROR, str(e)))
    return findings


def check_config(path: Path) -> tuple[Finding, Config | None]:
    try:
        config = load_config(path)
        from agent.wiring import check_host  # what `config check` refuses too

        check_host(config)
    except AgentError as e:
        return Finding("config", FATAL, str(e)), None
    return Finding("config", OK, str(path)), config


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    doctor = subparsers.add_parser(
        "doctor", help="check config, EST, credentials, identity, TPM, clock and firmware"
    )
    add_config_option(doctor)
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--warnings-as-errors", action="store_true", help="exit 1 on a warning too")
    doctor.set_defaults(func=run)


_LABEL = {OK: "ok", WARNING: "warning", ERROR: "ERROR", FATAL: "FATAL"}


def run(args: argparse.Namespace) -> int:
    try:
        path = config_path(args.config)
    except AgentError as e:
        finding, config = Finding("config", FATAL, str(e)), None
    else:
        finding, config = check_config(path)
    findings = [finding, *(run_checks(config) if config is not None else [])]
    if args.json:
        print(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        for f in findings:
            print(f"{_LABEL[f.status]:<7}  {f.check}: {one_line(f.detail)}")
    failing = {ERROR, FATAL} | ({WARNING} if args.warnings_as_errors else set())
    return 1 if any(f.status in failing for f in findings) else 0
