"""One status model for the whole agent, shared by the CLI (and later the control socket and MQTT).

Pure: built from what the stores return and `now`; rendered as text for people, JSON for tools.
`StatusCollector` asks the stores it is given (`agent.wiring.status_collector` picks them) and
turns a part that cannot be read into an error line, never a failure: status must work on a
device that is half broken, because that is when people ask for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from agent import __version__
from agent.errors import AgentError
from agent.validity import validity

if TYPE_CHECKING:
    from cryptography import x509

    from agent.clock import Clock
    from agent.components import Snapshot
    from agent.est.pending import PendingRequest
    from agent.identity import Identity


@dataclass(frozen=True)
class IdentityStatus:
    #: "none" (not enrolled), "valid", "expired", "not_yet_valid" or "unreadable" (see errors)
    state: str
    generation: int | None = None
    subject: str = ""
    serial: str = ""
    issuer: str = ""
    not_before: str = ""
    not_after: str = ""
    seconds_left: int | None = None
    #: share of the certificate's lifetime still ahead, 0.0 .. 1.0
    lifetime_left: float | None = None
    key_store: str = ""
    hardware_backed: bool | None = None
    key_file: str = ""
    cert_file: str = ""
    #: the key loaded and made a signature the certificate verifies (None: not checked)
    key_usable: bool | None = None


@dataclass(frozen=True)
class PendingStatus:
    operation: str
    retry_at: str
    attempts: int


#: the version of `status --json`'s layout: raised when a field changes meaning or goes away
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ServiceStatus:
    """The long-running service (`devid-agent run`), as it answered over the control socket, or
    why it did not."""

    running: bool
    #: `control.enabled`: the service is expected to run (exit 87 when it does not)
    expected: bool = True
    #: when not running: what the socket said ("no socket", "refused", "does not answer: ...")
    detail: str = ""
    started_at: str = ""
    #: the next action ("renew", "enroll", "bootstrap", "wait"), when, and why
    next_action: str = ""
    next_at: str = ""
    reason: str = ""
    clock_trusted: bool | None = None
    consecutive_failures: int | None = None
    last_attempt: str = ""
    last_success: str = ""
    last_error: str = ""
    last_disposition: str = ""
    renewal_requested: bool = False
    #: the attempt at work now ("renew", "enroll", "bootstrap"; "" when none)
    attempt_in_progress: str = ""
    #: each component's own status, by name (e.g. "mqtt": {"connected": true, ...})
    components: dict[str, dict[str, Any]] = field(default_factory=dict)


def service_status(snapshot: Snapshot) -> ServiceStatus:
    def when(moment: datetime | None) -> str:
        return "" if moment is None else _iso(moment)

    return ServiceStatus(
        running=True,
        started_at=_iso(snapshot.started_at),
        next_action=snapshot.next_action,
        next_at=_iso(snapshot.next_at),
        reason=snapshot.reason,
        clock_trusted=snapshot.clock_trusted,
        consecutive_failures=snapshot.consecutive_failures,
        last_attempt=when(snapshot.last_attempt),
        last_success=when(snapshot.last_success),
        last_error=snapshot.last_error or "",
        last_disposition=snapshot.last_disposition or "",
        renewal_requested=snapshot.renewal_requested,
        attempt_in_progress=snapshot.attempt_in_progress,
        components={name: dict(values) for name, values in snapshot.components.items()},
    )


def _service_lines(s: ServiceStatus) -> list[str]:
    if not s.running:
        why = f" ({s.detail})" if s.detail else ""
        expected = "" if s.expected else ", not expected here (control.enabled = false)"
        return [f"service:   not running{why}{expected}"]
    if not s.started_at:  # it answered, but not with its status
        return [f"service:   running ({s.detail})"]
    lines = [f"service:   running since {s.started_at}"]
    if s.clock_trusted is False:
        lines.append(f"  clock:   NOT TRUSTED: {s.reason}")
    elif s.attempt_in_progress:
        lines.append(f"  now:     {s.attempt_in_progress} at work (in its own process)")
    else:
        lines.append(f"  next:    {s.next_action} at {s.next_at} ({s.reason})")
    if s.last_attempt:
        outcome = s.last_disposition or "ok"
        failures = f", {s.consecutive_failures} failing in a row" if s.consecutive_failures else ""
        lines.append(f"  last:    attempt at {s.last_attempt}: {outcome}{failures}")
        if s.consecutive_failures and s.last_error:
            lines.append(f"  error:   {s.last_error}")
    if s.last_success:
        lines.append(f"  renewed: {s.last_success}")
    for name, values in sorted(s.components.items()):
        shown = ", ".join(f"{k}={v}" for k, v in sorted(values.items()))
        lines.append(f"  {name}: {shown}")
    return lines


@dataclass(frozen=True)
class TrustStatus:
    """The EST trust on disk: the explicit anchor and the stored CA set, earliest expiries."""

    anchor_file: str = ""  # "" before a fingerprint bootstrap stored one
    anchor_not_after: str = ""
    ca_certificates: int = 0
    ca_set_not_after: str = ""


@dataclass(frozen=True)
class AgentStatus:
    device_id: str
    config: str
    identity: IdentityStatus
    est_pending: PendingStatus | None
    #: the firmware status as a dict, None when firmware is not configured
    firmware: dict[str, Any] | None
    #: the one-line error for a part that could not be read (e.g. a corrupt boot env)
    errors: tuple[str, ...] = ()
    version: str = __version__
    #: None when EST is not configured
    trust: TrustStatus | None = None
    #: the service's view (None: not asked, e.g. in metrics)
    service: ServiceStatus | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def healthy(self) -> bool:
        """A valid identity and every part readable (the exit status of `status`)."""
        return self.identity.state == "valid" and not self.errors

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        i = self.identity
        lines = [f"devid-agent {self.version}, device {self.device_id} ({self.config})"]
        if i.state == "none":
            lines.append("identity:  none (run `devid-agent enroll`)")
        elif i.state == "unreadable":
            lines.append("identity:  unreadable (see the error below)")
        else:
            backing = "TPM, non-exportable" if i.hardware_backed else "software key, WEAKER"
            left = _duration(i.seconds_left or 0)
            lines += [
                f"identity:  {i.state}, generation {i.generation}",
                f"  subject: {i.subject}",
                f"  serial:  {i.serial}",
                f"  issuer:  {i.issuer}",
                f"  valid:   {i.not_before} .. {i.not_after}"
                + (
                    f" ({left} left, {i.lifetime_left:.0%} of its lifetime)"
                    if i.state == "valid"
                    else ""
                ),
                f"  key:     {i.key_file} ({backing})",
            ]
        if self.est_pending is not None:
            p = self.est_pending
            lines.append(
                f"EST:       /{p.operation} pending, next attempt after {p.retry_at} "
                f"(attempt {p.attempts})"
            )
        if self.firmware is not None:
            fw = self.firmware
            lines.append(
                f"firmware:  booted {fw['booted']}, next boot {fw['next_boot'] or 'none'}, "
                f"committed security version {fw['committed_security_version']}"
                + (", LAST BOOT FELL BACK" if fw["fell_back"] else "")
            )
        if self.trust is not None:
            t = self.trust
            anchor = f"{t.anchor_file} until {t.anchor_not_after}" if t.anchor_file else "none yet"
            cas = f"{t.ca_certificates} until {t.ca_set_not_after}" if t.ca_certificates else "none"
            lines.append(f"trust:     anchor {anchor}; EST CA set {cas}")
        if self.service is not None:
            lines += _service_lines(self.service)
        lines += [f"error:     {e}" for e in self.errors]
        # One line per item whatever a certificate or an error message holds (a CN with a newline
        # from a hostile server must not forge a line of this report).
        return "\n".join(_one_line(line) for line in lines)


def _one_line(text: str) -> str:
    return "".join(
        ch.encode("unicode_escape").decode("ascii") if ord(ch) < 0x20 or ord(ch) == 0x7F else ch
        for ch in text
    )


def _duration(seconds: int) -> str:
    days, rest = divmod(max(seconds, 0), 86400)
    hours, rest = divmod(rest, 3600)
    return f"{days}d {hours}h" if days else f"{hours}h {rest // 60}m"


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def identity_status(
    identity: Identity | None, *, now: datetime, skew: timedelta = timedelta(0)
) -> IdentityStatus:
    """The identity at `now` by the one validity rule (`agent.validity`), with the clock skew
    that enroll and renew allow, so `status` calls valid what `enroll` would keep."""
    if identity is None:
        return IdentityStatus(state="none")
    cert: x509.Certificate = identity.certificate
    v = validity(cert, now, skew)
    return IdentityStatus(
        state=v.state.value,
        generation=identity.generation,
        subject=cert.subject.rfc4514_string(),
        serial=f"{cert.serial_number:x}",
        issuer=cert.issuer.rfc4514_string(),
        not_before=_iso(v.not_before),
        not_after=_iso(v.not_after),
        seconds_left=int(v.seconds_left),
        lifetime_left=v.lifetime_left,
        key_store="tpm" if identity.key_in_tpm else "software",
        hardware_backed=identity.key_in_tpm,
        key_file=str(identity.key_file),
        cert_file=str(identity.cert_file),
    )


def trust_status(
    anchor_file: str, anchor: Sequence[x509.Certificate], ca_set: Sequence[x509.Certificate]
) -> TrustStatus:
    def earliest(certs: Sequence[x509.Certificate]) -> str:
        return _iso(min(c.not_valid_after_utc for c in certs)) if certs else ""

    return TrustStatus(
        anchor_file=anchor_file,
        anchor_not_after=earliest(anchor),
        ca_certificates=len(ca_set),
        ca_set_not_after=earliest(ca_set),
    )


def pending_status(pending: PendingRequest | None) -> PendingStatus | None:
    if pending is None:
        return None
    return PendingStatus(
        operation=pending.operation, retry_at=_iso(pending.retry_at), attempts=pending.attempts
    )


class IdentitySource(Protocol):
    def current(self) -> Identity | None: ...


class PendingSource(Protocol):
    def load(self) -> PendingRequest | None: ...


class FirmwareReport(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


class KeyNotChecked(AgentError):
    """The key check cannot run now (an attempt is using the TPM): the key is neither usable nor
    unusable as far as this status knows (`key_usable` stays null)."""


class StatusCollector:
    """Collects an `AgentStatus` from the stores it is given."""

    def __init__(
        self,
        *,
        device_id: str,
        config_source: str,
        identities: IdentitySource,
        pending: PendingSource,
        #: the firmware status (root's own, or the snapshot root leaves for everyone else)
        firmware: Callable[[], FirmwareReport] | None,
        clock: Clock,
        skew: timedelta,
        key_check: Callable[[Identity], None] | None = None,
        trust: Callable[[], TrustStatus] | None = None,
    ) -> None:
        self._device_id = device_id
        self._config_source = config_source
        self._identities = identities
        self._pending = pending
        self._firmware = firmware
        self._clock = clock
        self._skew = skew
        self._key_check = key_check
        self._trust = trust

    def collect(self) -> AgentStatus:
        errors: list[str] = []
        try:
            current = self._identities.current()
            identity = identity_status(current, now=self._clock.now(), skew=self._skew)
        except AgentError as e:
            current, identity = None, IdentityStatus(state="unreadable")
            errors.append(str(e))
        if current is not None and self._key_check is not None:
            try:  # healthy only when the key loads and signs for the certificate
                self._key_check(current)
                identity = replace(identity, key_usable=True)
            except KeyNotChecked:
                pass
            except AgentError as e:
                identity = replace(identity, key_usable=False)
                errors.append(f"the identity's key is unusable: {e}")
        pending: PendingStatus | None = None
        try:
            pending = pending_status(self._pending.load())
        except AgentError as e:
            errors.append(str(e))
        firmware: dict[str, Any] | None = None
        if self._firmware is not None:
            try:
                firmware = self._firmware().to_dict()
            except AgentError as e:
                errors.append(str(e))
        trust: TrustStatus | None = None
        if self._trust is not None:
            try:
                trust = self._trust()
            except AgentError as e:
                errors.append(str(e))
        return AgentStatus(
            device_id=self._device_id,
            config=self._config_source,
            identity=identity,
            est_pending=pending,
            firmware=firmware,
            errors=tuple(errors),
            trust=trust,
        )
