"""The parts of the service that live beside the renewal loop: the MQTT channel, the control
socket, the CA refresh. The contract between them and agent/daemon.py.

One thread. Each turn the daemon asks every component which descriptors it waits on and when it
next needs a turn without I/O, selects on all of them and its wake-up pipe, then gives each
component its turn with the descriptors that are ready for it. A component never blocks longer
than its configured timeouts (as the renewal steps do): the loop is the watchdog's heartbeat.

Components talk to the daemon only through `Host`: a snapshot of what the daemon knows (for
`status` over the socket and the MQTT status topic), requests (renew now, reload), and events
(rotated, command refused, ...), which every component receives. A component that raises is
stopped and logged; the renewal loop goes on without it until the next reload.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

__all__ = ["Component", "Event", "EventKind", "Host", "IdentitySummary", "Snapshot"]

#: the value types an event or a component status may carry (they become JSON)
Scalar = str | int | float | bool | None


class EventKind:
    """Event names: stable strings, they appear on the MQTT events topic and in the audit trail."""

    ATTEMPT_STARTED = "attempt_started"  # detail: action, reason
    ATTEMPT_FINISHED = "attempt_finished"  # detail: action, ok, disposition, message, requested
    ENROLLED = "enrolled"  # detail: generation, serial, not_after
    ROTATED = "rotated"  # detail: generation, serial, not_after (the new identity is proven)
    ROTATION_FAILED = "rotation_failed"  # detail: disposition, message
    RELOADED = "reloaded"  # detail: source
    # from components:
    CA_CHANGED = "ca_changed"  # detail: old_sha256, new_sha256, certificates, new_roots
    CA_REFUSED = "ca_refused"  # a fetched CA set failed the trust checks; detail: message
    CA_REFRESHED = "ca_refreshed"  # every refresh; detail: result (same/changed/refused/...)
    COMMAND_ACCEPTED = "command_accepted"
    COMMAND_REFUSED = "command_refused"
    PEER_REFUSED = "peer_refused"
    FIRMWARE_INSTALLED = "firmware_installed"  # detail: slot, version, security_version
    FIRMWARE_COMMITTED = "firmware_committed"  # ... and committed_security_version
    FIRMWARE_ROLLED_BACK = "firmware_rolled_back"  # detail: booted, failed
    CHANNEL_REJECTED = "channel_rejected"  # the broker refused our identity; detail: reason
    # requests between components (the control socket or a command asks, another acts):
    CHANNEL_RECONNECT_REQUESTED = "channel_reconnect_requested"
    CACERTS_REFRESH_REQUESTED = "cacerts_refresh_requested"


@dataclass(frozen=True)
class Event:
    kind: str
    at: datetime
    detail: Mapping[str, Scalar] = field(default_factory=dict)
    #: the component that emitted it ("" for the daemon itself)
    source: str = ""


@dataclass(frozen=True)
class IdentitySummary:
    generation: int
    serial: str  # hex
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True)
class Snapshot:
    """What the running daemon knows, at `now`."""

    now: datetime
    started_at: datetime
    identity: IdentitySummary | None
    #: the next action ("renew", "enroll", "bootstrap", "wait"), when, and why
    next_action: str
    next_at: datetime
    reason: str
    clock_trusted: bool
    consecutive_failures: int
    last_attempt: datetime | None
    last_success: datetime | None
    last_error: str | None
    last_disposition: str | None
    #: a renewal was requested and has not run yet
    renewal_requested: bool
    #: each running component's own status, by component name
    components: Mapping[str, Mapping[str, Scalar]]
    #: the attempt at work now ("renew", "enroll", "bootstrap"; "" when none)
    attempt_in_progress: str = ""


class Host(Protocol):
    """The daemon, as a component sees it."""

    def snapshot(self) -> Snapshot: ...

    def request_renewal(self) -> None:
        """Renew (or enroll) at the next turn, whatever the schedule says; the outcome comes as
        an ATTEMPT_FINISHED event with `requested` true (or false at once, when the clock is
        not trustworthy)."""

    def request_reload(self) -> None: ...

    def emit(self, event: Event) -> None:
        """Give `event` to every component (the emitter included) after this turn."""


class Component(Protocol):
    name: str

    def start(self, host: Host) -> None:
        """Bind, connect or open what it needs (an AgentError leaves the component stopped)."""

    def descriptors(self) -> tuple[Sequence[int], Sequence[int]]:
        """The descriptors to wait on: (readable, writable)."""

    def next_turn(self) -> datetime | None:
        """The latest time it wants a turn even without I/O (None: only on I/O)."""

    def turn(self, now: datetime, readable: Collection[int], writable: Collection[int]) -> None:
        """Do what is due and what the ready descriptors allow, without blocking."""

    def on_event(self, event: Event) -> None: ...

    def status(self) -> Mapping[str, Scalar]:
        """For the snapshot: e.g. {"connected": True, "since": "..."}."""

    def stop(self) -> None:
        """Close everything; called once, also after a failed start."""
