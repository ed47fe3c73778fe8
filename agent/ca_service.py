"""The CA refresh as a component of the service (agent/components.py): /cacerts on a schedule.

The decisions are agent/ca_refresh.py's (when, and what a fetched set may replace); this does
the I/O through the enroller (the same anchor, transport, store and lock as enrollment): fetch
over TLS verified against the explicit anchor, judge, and store a changed set atomically. A
changed set is a `ca_changed` event and an audit entry; a refused one (nothing in it chains to
the trust the agent has) a `ca_refused` event, an audit entry and an error line, and the stored
set stays byte for byte as it was. Every refresh ends with a `ca_refreshed` event (for the
metrics). `cacerts_refresh_requested` events (an MQTT command, the control socket) make it
refresh at its next turn.

The schedule is not persisted: the refresh point is a function of the device id, the stored set
and the clock (agent/ca_refresh.py), so a restart lands on the same one; a backoff in progress
starts over after a restart, at the next regular point.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.ca_refresh import RefreshPolicy, Verdict, earliest_expiry, judge, next_refresh
from agent.clock import Clock
from agent.components import Event, EventKind, Host, Scalar
from agent.errors import AgentError, classify
from agent.est.memory import ca_set_sha256
from agent.est.response import fingerprint

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger(__name__)

#: certificates described in a `ca_changed` audit entry, at most
AUDITED_CERTS = 4


class CaSource(Protocol):
    """What the refresh needs of the enroller (agent/enroll.py)."""

    def explicit_anchor(self) -> Path | None: ...

    def fetch_cacerts(self, anchor: Path) -> list[x509.Certificate]: ...

    def stored_ca_set(self) -> list[x509.Certificate]: ...

    def adopt_ca_set(self, certs: list[x509.Certificate], anchor: Path) -> None: ...


class Recorder(Protocol):
    def record(self, event: str, fields: dict[str, Any] | None = None) -> bool: ...


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _described(cert: x509.Certificate) -> str:
    subject = cert.subject.rfc4514_string()
    return f"{subject} sha256:{fingerprint(cert)[:16]} until {_iso(cert.not_valid_after_utc)}"


class CaRefresher:
    name = "ca_refresh"

    def __init__(
        self,
        *,
        source: CaSource,
        policy: RefreshPolicy,
        device_id: str,
        clock: Clock,
        skew: timedelta,
        audit: Recorder,
        load_anchors: Callable[[Path], list[x509.Certificate]],
    ) -> None:
        self._source = source
        self._policy = policy
        self._device_id = device_id
        self._clock = clock
        self._skew = skew
        self._audit = audit
        self._load_anchors = load_anchors
        self._host: Host | None = None
        self._requested = False
        self._attempting = False  # between attempt_started and attempt_finished
        self._failures = 0
        self._security = False  # the last failure was a refused set
        self._last_attempt: datetime | None = None
        self._last_success: datetime | None = None
        self._last_error: str | None = None
        self._last_result: str | None = None
        self._set_sha256 = ""
        self._expiry: datetime | None = None
        self._next: datetime | None = None

    # -- the Component protocol ----------------------------------------------------------------

    def start(self, host: Host) -> None:
        self._host = host
        self._reload_stored()
        if self._next is not None:
            log.info("CA refresh: next /cacerts at %s", _iso(self._next))

    def descriptors(self) -> tuple[Sequence[int], Sequence[int]]:
        return (), ()

    def next_turn(self) -> datetime | None:
        if self._attempting:  # at the attempt's end (its attempt_finished)
            return None
        return self._clock.now() if self._requested else self._next

    def turn(self, now: datetime, readable: Collection[int], writable: Collection[int]) -> None:
        if self._attempting:  # one EST client at a time, and the attempt may store a set too
            return
        if self._requested or (self._next is not None and now >= self._next):
            requested, self._requested = self._requested, False
            self.refresh(now, requested=requested)

    def on_event(self, event: Event) -> None:
        if event.kind == EventKind.CACERTS_REFRESH_REQUESTED:
            self._requested = True
        elif event.kind == EventKind.ATTEMPT_STARTED:
            self._attempting = True
        elif event.kind == EventKind.ATTEMPT_FINISHED:
            self._attempting = False
        elif event.kind in (EventKind.ENROLLED, EventKind.ROTATED):
            self._reload_stored()  # an enrollment may have stored a set it fetched

    def status(self) -> Mapping[str, Scalar]:
        return {
            "enabled": self._policy.interval_seconds > 0,
            "last_refresh": _iso(self._last_attempt),
            "last_success": _iso(self._last_success),
            "last_result": self._last_result,
            "last_error": self._last_error,
            "consecutive_failures": self._failures,
            "next_refresh": _iso(self._next),
            "ca_set_sha256": self._set_sha256,
            "ca_set_not_after": _iso(self._expiry),
        }

    def stop(self) -> None:
        self._host = None

    # -- the refresh -----------------------------------------------------------------------------

    def refresh(self, now: datetime, *, requested: bool = False) -> None:
        self._last_attempt = now
        try:
            anchor = self._source.explicit_anchor()
            if anchor is None:
                self._finish(now, "skipped", requested, None)
                log.info("CA refresh: no trust anchor yet (the first enrollment bootstraps it)")
                return
            current = self._source.stored_ca_set()
            if not current:
                self._finish(now, "skipped", requested, None)
                log.info("CA refresh: no CA set stored yet (enrollment fetches /cacerts)")
                return
            fetched = self._source.fetch_cacerts(anchor)
            verdict = judge(
                fetched,
                anchors=self._load_anchors(anchor),
                current=current,
                now=self._clock.now(),
                skew=self._skew,
            )
            for line in verdict.dropped:
                log.warning("CA refresh: not kept from /cacerts: %s", line)
            if verdict.changed:
                self._source.adopt_ca_set(list(verdict.certificates), anchor)
                self._changed(verdict)
                result = "changed"
            else:
                result = "same"
        except AgentError as e:
            self._failed(now, e, requested)
            return
        self._failures = 0
        self._security = False
        self._last_error = None
        self._last_success = now
        self._finish(now, result, requested, None)

    def _changed(self, verdict: Verdict) -> None:
        certs = verdict.certificates
        fields: dict[str, Any] = {
            "old_sha256": verdict.previous_sha256,
            "new_sha256": verdict.sha256,
            "count": len(certs),
            # audit values are short scalars (agent/audit.py): the first few, with their digests
            "certificates": "; ".join(_described(c) for c in certs[:AUDITED_CERTS]),
            "new_roots": " ".join(fingerprint(c) for c in verdict.new_roots[:AUDITED_CERTS]),
        }
        self._audit.record("ca_changed", fields)
        log.warning(
            "CA refresh: the EST CA set changed (%s -> %s): %d certificate(s)%s",
            verdict.previous_sha256[:16] or "none", verdict.sha256[:16], len(certs),
            f", {len(verdict.new_roots)} new root(s) adopted through NewWithOld"
            if verdict.new_roots else "",
        )  # fmt: skip
        self._emit(
            EventKind.CA_CHANGED,
            old_sha256=verdict.previous_sha256,
            new_sha256=verdict.sha256,
            certificates=len(certs),
            new_roots=len(verdict.new_roots),
        )

    def _failed(self, now: datetime, error: AgentError, requested: bool) -> None:
        kind = classify(error).kind
        self._failures += 1
        self._security = kind.security
        self._last_error = str(error)
        if kind.security:
            log.error("CA refresh refused the EST CA set (%s): %s", kind.value, error)
            self._audit.record(
                "ca_refused",
                {"outcome": "failed", "disposition": kind.value, "error": str(error),
                 "kept_sha256": self._set_sha256},
            )  # fmt: skip
            self._emit(EventKind.CA_REFUSED, disposition=kind.value, message=str(error),
                       kept_sha256=self._set_sha256)  # fmt: skip
        else:
            log.warning("CA refresh failed (%s): %s", kind.value, error)
        self._finish(now, "refused" if kind.security else "failed", requested, kind.value)

    def _finish(self, now: datetime, result: str, requested: bool, disposition: str | None) -> None:
        self._last_result = result
        self._reload_stored(now)
        self._emit(
            EventKind.CA_REFRESHED, result=result, requested=requested,
            disposition=disposition or "ok", message=self._last_error or "",
        )  # fmt: skip
        if self._next is not None:
            log.info("CA refresh: %s; next /cacerts at %s", result, _iso(self._next))

    def _reload_stored(self, now: datetime | None = None) -> None:
        try:
            stored = self._source.stored_ca_set()
        except AgentError as e:
            log.warning("CA refresh: the stored CA set cannot be read: %s", e)
            stored = []
        self._set_sha256 = ca_set_sha256(stored) if stored else ""
        self._expiry = earliest_expiry(stored)
        self._next = next_refresh(
            device_id=self._device_id,
            ca_set=self._set_sha256,
            now=now or self._clock.now(),
            last_attempt=self._last_attempt,
            failures=self._failures,
            expiry=self._expiry,
            policy=self._policy,
            security=self._security,
        )

    def _emit(self, kind: str, **detail: Scalar) -> None:
        if self._host is not None:
            self._host.emit(Event(kind=kind, at=self._clock.now(), detail=detail, source=self.name))
