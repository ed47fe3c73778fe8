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
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
    yield _Family("status_errors", "gauge", "Parts of the status that could not be read.").add(
        len(status.errors)
    )
    yield _Family(
        "metrics_generated_timestamp_seconds", "gauge", "When this file was written, Unix time."
    ).add(_epoch(now))


def render(status: AgentStatus, renewal: RenewalFacts | None, now: datetime) -> str:
    """The whole textfile (ends with a newline)."""
    return "\n".join(line for f in families(status, renewal, now) for line in f.lines) + "\n"
