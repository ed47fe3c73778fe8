"""Prometheus text exposition (format 0.0.4) for node_exporter's textfile collector. Pure.

`render(status, renewal, now)` turns the status model (`agent.status.AgentStatus`) and what the
scheduler remembers (`RenewalFacts`, when known) into the file's text. Names follow Prometheus'
conventions: the `devid_agent_` prefix, base units (seconds), `_timestamp_seconds` for moments
as Unix time, `_total` for counters, `_info` for constant-1 series that carry labels. A value
that is not known is left out rather than written as 0 (a missing series alerts as `absent()`;
a zero would look like the epoch).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.components import Snapshot
    from agent.status import AgentStatus

PREFIX = "devid_agent_"


@dataclass(frozen=True)
class RenewalFacts:
    """What the scheduler's state file says, if it exists (None: not known)."""

    last_success: datetime | None = None
    last_attempt: datetime | None = None
    consecutive_failures: int | None = None


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Family:
    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = PREFIX + name
        self.lines = [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {kind}"]

    def add(self, value: float, labels: dict[str, str] | None = None) -> _Family:
        text = ""
        if labels:
            inner = ",".join(f'{k}="{_label(v)}"' for k, v in sorted(labels.items()))
            text = "{" + inner + "}"
        self.lines.append(f"{self.name}{text} {_number(value)}")
        return self


def _epoch(moment: datetime) -> float:
    return moment.astimezone(timezone.utc).timestamp()


def _parse_iso(text: str) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def families(status: AgentStatus, renewal: RenewalFacts | None, now: datetime) -> Iterable[_Family]:
    yield _Family("build_info", "gauge", "devid-agent's version.").add(
        1, {"version": status.version}
    )
    i = status.identity
    yield _Family(
        "identity_info", "gauge", "The identity: state (none, valid, expired, ...) and key store."
    ).add(
        1,
        {
            "state": i.state,
            "key_store": i.key_store,
            "hardware_backed": "" if i.hardware_backed is None else str(i.hardware_backed).lower(),
        },
    )
    yield _Family("identity_valid", "gauge", "1 when the identity is valid now.").add(
        1 if i.state == "valid" else 0
    )
    not_after = _parse_iso(i.not_after)
    if not_after is not None:
        yield _Family(
            "certificate_not_after_timestamp_seconds",
            "gauge",
            "End of the identity certificate's validity, Unix time.",
        ).add(_epoch(not_after))
    not_before = _parse_iso(i.not_before)
    if not_before is not None:
        yield _Family(
            "certificate_not_before_timestamp_seconds",
            "gauge",
            "Start of the identity certificate's validity, Unix time.",
        ).add(_epoch(not_before))
    if i.lifetime_left is not None:
        yield _Family(
            "certificate_lifetime_left_ratio",
            "gauge",
            "Share of the certificate's lifetime still ahead (0..1).",
        ).add(max(0.0, min(1.0, i.lifetime_left)))
    if i.generation is not None:
        yield _Family(
            "identity_generation", "gauge", "The current identity generation (gen-N)."
        ).add(i.generation)
    yield _Family("est_pending", "gauge", "1 when an EST request awaits approval (202).").add(
        0 if status.est_pending is None else 1
    )
    if renewal is not None:
        if renewal.last_success is not None:
            yield _Family(
                "renewal_last_success_timestamp_seconds",
                "gauge",
                "When the last renewal succeeded, Unix time.",
            ).add(_epoch(renewal.last_success))
        if renewal.last_attempt is not None:
            yield _Family(
                "renewal_last_attempt_timestamp_seconds",
                "gauge",
                "When the last renewal attempt started, Unix time.",
            ).add(_epoch(renewal.last_attempt))
        if renewal.consecutive_failures is not None:
            yield _Family(
                "renewal_consecutive_failures",
                "gauge",
                "Failed renewal attempts since the last success.",
            ).add(renewal.consecutive_failures)
    fw = status.firmware
    if fw is not None:
        yield _Family("firmware_booted_slot_info", "gauge", "The booted A/B slot.").add(
            1, {"slot": str(fw.get("booted", ""))}
        )
        version = fw.get("committed_security_version")
        if isinstance(version, int):
            yield _Family(
                "firmware_committed_security_version",
                "gauge",
                "The committed anti-rollback security version.",
            ).add(version)
        yield _Family(
            "firmware_fell_back", "gauge", "1 when the bootloader fell back from a new slot."
        ).add(1 if fw.get("fell_back") else 0)
    trust = status.trust
    if trust is not None:
        anchor_end = _parse_iso(trust.anchor_not_after)
        if anchor_end is not None:
            yield _Family(
                "trust_anchor_not_after_timestamp_seconds",
                "gauge",
                "End of the EST trust anchor's validity (the earliest in its file), Unix time.",
            ).add(_epoch(anchor_end))
        ca_end = _parse_iso(trust.ca_set_not_after)
        if ca_end is not None:
            yield _Family(
                "ca_certificates_not_after_timestamp_seconds",
                "gauge",
                "The earliest end of validity in the stored EST CA set, Unix time.",
            ).add(_epoch(ca_end))
    yield _Family("status_errors", "gauge", "Parts of the status that could not be read.").add(
        len(status.errors)
    )
    yield _Family(
        "metrics_generated_timestamp_seconds", "gauge", "When this file was written, Unix time."
    ).add(_epoch(now))


def render(
    status: AgentStatus,
    renewal: RenewalFacts | None,
    now: datetime,
    service: tuple[Snapshot, ServiceCounters] | None = None,
) -> str:
    """The whole textfile (ends with a newline); with `service`, what only the running service
    knows too."""
    found = list(families(status, renewal, now))
    if service is not None:
        found += service_families(*service)
    return "\n".join(line for f in found for line in f.lines) + "\n"


@dataclass
class ServiceCounters:
    """Counted from the service's events since it started (agent/metrics_service.py). They
    start from zero at every start, as Prometheus counters may: `rate()` and `increase()` take
    the reset in their stride, and `service_start_time_seconds` shows it."""

    #: (action, disposition) -> attempts; disposition "ok" for a success
    attempts: dict[tuple[str, str], int] = field(default_factory=dict)
    failures: dict[tuple[str, str], int] = field(default_factory=dict)
    commands_refused: int = 0
    #: result (same, changed, refused, failed, skipped) -> refreshes
    ca_refreshes: dict[str, int] = field(default_factory=dict)
    ca_changes: int = 0


def service_families(snapshot: Snapshot, counters: ServiceCounters) -> Iterable[_Family]:
    yield _Family(
        "service_start_time_seconds", "gauge", "When the running service started, Unix time."
    ).add(_epoch(snapshot.started_at))
    attempts = _Family(
        "renewal_attempts_total", "counter", "Renewal (and enrollment) attempts, by outcome."
    )
    for (action, disposition), n in sorted(counters.attempts.items()):
        attempts.add(n, {"action": action, "disposition": disposition})
    yield attempts
    failures = _Family(
        "renewal_failures_total", "counter", "Failed renewal attempts, by disposition."
    )
    for (action, disposition), n in sorted(counters.failures.items()):
        failures.add(n, {"action": action, "disposition": disposition})
    yield failures
    if snapshot.clock_trusted:
        yield _Family(
            "renewal_next_timestamp_seconds",
            "gauge",
            "When the service next renews (or enrolls), Unix time.",
        ).add(_epoch(snapshot.next_at), {"action": snapshot.next_action})
    yield _Family("clock_trusted", "gauge", "1 when the service believes the system clock.").add(
        1 if snapshot.clock_trusted else 0
    )
    mqtt = snapshot.components.get("mqtt")
    if mqtt is not None and isinstance(mqtt.get("connected"), bool):
        yield _Family("channel_connected", "gauge", "1 while the MQTT channel is connected.").add(
            1 if mqtt["connected"] else 0
        )
    yield _Family(
        "commands_refused_total", "counter", "Commands refused (MQTT, control socket)."
    ).add(counters.commands_refused)
    refreshes = _Family(
        "ca_refreshes_total", "counter", "Scheduled or requested /cacerts refreshes, by result."
    )
    for result, n in sorted(counters.ca_refreshes.items()):
        refreshes.add(n, {"result": result})
    yield refreshes
    yield _Family("ca_changes_total", "counter", "Times a refresh stored a changed CA set.").add(
        counters.ca_changes
    )
    ca = snapshot.components.get("ca_refresh")
    last = _parse_iso(str(ca.get("last_success") or "")) if ca is not None else None
    if last is not None:
        yield _Family(
            "ca_refresh_last_success_timestamp_seconds",
            "gauge",
            "When /cacerts was last fetched and judged, Unix time.",
        ).add(_epoch(last))
    failing = ca.get("consecutive_failures") if ca is not None else None
    if isinstance(failing, int):
        yield _Family(
            "ca_refresh_consecutive_failures", "gauge", "Failed /cacerts refreshes in a row."
        ).add(failing)
    upcoming = _parse_iso(str(ca.get("next_refresh") or "")) if ca is not None else None
    if upcoming is not None:
        yield _Family(
            "ca_refresh_next_timestamp_seconds", "gauge", "Next /cacerts fetch, Unix time."
        ).add(_epoch(upcoming))
