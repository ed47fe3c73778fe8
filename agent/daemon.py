"""`devid-agent run`: one process that keeps the device's identity valid, by itself.

One loop in one thread. Each turn: read the current identity, ask the pure policy
(agent/renewal.py) what to do and when, act when it is time, then sleep until the next decision
or the next watchdog ping, whichever comes first. Signal handlers only set a flag and write a
byte to a wake-up pipe (no logging, no I/O beyond that byte): SIGTERM/SIGINT stop the loop after
the step in progress (each is bounded by the configured timeouts), SIGHUP reloads the config (an
invalid one is refused in one line and the old one kept).

Every attempt is recorded in the scheduler state before the network is used
(agent/renewal_state.py), so a crash counts as a failed attempt and a restart resumes the
backoff. A renewal's new identity must prove itself over mutual TLS before `identity/current`
moves (Enroller's verified rotation); then the post-rotation hooks run.

systemd: `READY=1` once the state is read, a readable `STATUS=` after every turn, `WATCHDOG=1`
only from the loop, so a step that hangs (a TPM or network call) stops the pings and lets the
watchdog restart the service; `RELOADING=1` and `STOPPING=1`.

Everything it touches comes in through `DaemonParts` (built by agent/wiring.py for each config),
so a reload rebuilds them and tests can give their own. The parts that live beside the loop (the
MQTT channel, the control socket) are `components` (agent/components.py): the loop waits on
their descriptors too, gives them turns, tells them what happened (events) and answers their
requests (a snapshot, renew now, reload).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from types import FrameType
from typing import Protocol, TypeVar

from agent.clock import Clock, Interrupt
from agent.components import Component, Event, EventKind, IdentitySummary, Scalar, Snapshot
from agent.config import Config
from agent.errors import AgentError, classify
from agent.identity import Identity, IdentityStore
from agent.renewal import Action, CertFacts, Decision, Failure, RenewalPolicy, decide
from agent.renewal_state import (
    SchedulerState,
    SchedulerStateStore,
    clock_floor,
    record_attempt,
    record_failure,
    record_success,
)

log = logging.getLogger(__name__)
_R = TypeVar("_R")

#: the longest the loop sleeps without looking at the clock again (a clock set while we sleep)
MAX_SLEEP_SECONDS = 300.0
#: Retry-After honoured up to this long (a server asking for years is clamped)
MAX_RETRY_AFTER_SECONDS = 7 * 86400.0
HOOK_OUTPUT_CHARS = 2000


class Attempted(Protocol):
    """A successful attempt (agent/attempt_process.py Attempted, agent/enroll.py EnrollResult)."""

    @property
    def identity(self) -> Identity: ...

    @property
    def changed(self) -> bool: ...


class Attempt(Protocol):
    """One attempt at work in a process of its own (agent/attempt_process.py `Running`)."""

    @property
    def over(self) -> bool: ...

    def fileno(self) -> int: ...

    def wake_at(self) -> float:
        """The monotonic time by which `pump` must run (its deadline)."""
        ...

    def pump(self) -> bool:
        """Take what it said, without blocking; True once it is over."""
        ...

    def stop(self) -> None:
        """End it now (the service stops); over within a grace period."""
        ...

    def outcome(self) -> Attempted:
        """Its identity, or the AgentError it ended with (once over)."""
        ...


class Attempts(Protocol):
    """What acts for the scheduler (agent/attempt_process.py AttemptProcess)."""

    def start(self, action: str) -> Attempt:
        """`enroll`, `renew` or `bootstrap`, started (AgentError if it cannot start)."""
        ...


@dataclass
class _InFlight:
    attempt: Attempt
    action: Action
    requested: bool


@dataclass(frozen=True)
class DaemonParts:
    """What the daemon works with under one config."""

    config: Config
    enroller: Attempts
    identities: IdentityStore
    policy: RenewalPolicy
    bootstrap_available: bool
    #: started after the build, stopped before a reload's replacements start
    components: Sequence[Component] = field(default_factory=tuple)


class _Failed:
    """An attempt that could not start: over at once, its outcome the error."""

    over = True

    def __init__(self, error: AgentError) -> None:
        self._error = error

    def fileno(self) -> int:
        return -1

    def wake_at(self) -> float:
        return 0.0  # already over

    def pump(self) -> bool:
        return True

    def stop(self) -> None:
        pass

    def outcome(self) -> Attempted:
        raise self._error


class Wakeup:
    """A self-pipe: signal handlers write a byte, the loop sleeps on it."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def poke(self) -> None:
        with contextlib.suppress(BlockingIOError):  # already full of wake-ups: one is enough
            os.write(self._write, b"!")

    def wait(
        self, seconds: float, readable: Sequence[int] = (), writable: Sequence[int] = ()
    ) -> tuple[set[int], set[int]]:
        """Sleep until a poke, a ready descriptor or `seconds`; the ready descriptors."""
        ready, out, _ = select.select([self._read, *readable], writable, [], max(0.0, seconds))
        if self._read in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._read, 4096):
                    pass
        return set(ready) - {self._read}, set(out)

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


class Daemon:
    def __init__(
        self,
        *,
        load_config: Callable[[], Config],
        build: Callable[[Config], DaemonParts],
        state_store: Callable[[Config], SchedulerStateStore],
        clock: Clock,
        build_time: datetime,
        notify: Callable[..., bool],
        watchdog_seconds: float | None,
        interrupt: Interrupt | None = None,
    ) -> None:
        self._load_config = load_config
        self._build = build
        self._state_store = state_store
        self._clock = clock
        self._build_time = build_time
        self._notify = notify
        self._watchdog = watchdog_seconds
        self._wakeup = Wakeup()
        #: tripped by SIGTERM/SIGINT: an EST request in progress ends at once (the transport
        #: watches it), so the stop does not wait for the network's timeouts
        self._interrupt = interrupt
        self._stop = False
        self._reload = False
        self._renewal_requested = False
        self._components: list[Component] = []
        self._events: list[Event] = []
        self._ready: tuple[set[int], set[int]] = (set(), set())
        self._started_at = clock.now()
        self._view: tuple[Identity | None, SchedulerState, Decision] | None = None
        self._in_flight: _InFlight | None = None
        self._notify_failing = False

    # -- signals: flags and a byte, nothing else ----------------------------------------------

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stop = True
        if self._interrupt is not None:
            self._interrupt.trip()  # a flag and a byte, like the wakeup
        self._wakeup.poke()

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self._reload = True
        self._wakeup.poke()

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        parts = self._build(self._load_config())
        store = self._state_store(parts.config)
        state = store.load()
        started = _describe(self._current(parts))
        self._start_components(parts)
        self._say("READY=1", f"STATUS=started: {started}")
        log.info("devid-agent is running: %s", started)
        try:
            while not self._stop:
                if self._reload and self._in_flight is None:  # an attempt ends under its config
                    parts, store = self._reloaded(parts, store)
                now = self._clock.now()
                current = self._current(parts)  # read once a turn: decide, then report
                decision = self._decide(parts, state, current, now)
                wake = now + timedelta(seconds=MAX_SLEEP_SECONDS)  # while an attempt is at work
                if self._in_flight is not None:
                    if self._renewal_requested:  # the attempt at work answers the request
                        self._renewal_requested = False
                        self._in_flight.requested = True
                else:
                    # (while one works, the view stays the one that started it: its attempt is
                    # recorded as failed until it is over, for a crash's sake, not for status)
                    self._view = (current, state, decision)
                    requested = self._renewal_requested
                    if requested:
                        self._renewal_requested = False
                        decision = self._requested(decision, now)
                    if decision.action is not Action.WAIT and decision.at <= now:
                        state = self._begin(parts, store, state, decision, now, requested)
                        if self._in_flight is None:  # it could not start: decide again now
                            wake = now
                    else:
                        self._say(f"STATUS={_status_line(current, state, decision, now)}")
                        wake = decision.at
                self._sleep_until(wake, now)
                flight = self._in_flight
                if flight is not None and flight.attempt.pump():
                    state = self._finish(parts, store, state)
                self._turn_components()
        finally:
            flight = self._in_flight
            if flight is not None:  # stopping: SIGTERM ends its request at once, then it exits
                flight.attempt.stop()
                while not flight.attempt.pump():
                    self._wakeup.wait(flight.attempt.wake_at() - self._clock.monotonic(),
                                      [flight.attempt.fileno()])  # fmt: skip
                state = self._finish(parts, store, state)
            self._say("STOPPING=1")
            self._stop_components()
            self._wakeup.close()
        log.info("devid-agent stopped")
        return 0

    def stop(self) -> None:
        """Stop after the step in progress (as SIGTERM does)."""
        self._stop = True
        self._wakeup.poke()

    def _sleep_until(self, at: datetime, now: datetime) -> None:
        seconds = min((at - now).total_seconds(), MAX_SLEEP_SECONDS)
        if self._watchdog is not None:
            self._say("WATCHDOG=1")  # only here: a turn that hangs stops the pings
            seconds = min(seconds, self._watchdog)
        readable: list[int] = []
        writable: list[int] = []
        if self._in_flight is not None:
            attempt = self._in_flight.attempt
            readable.append(attempt.fileno())
            seconds = min(seconds, attempt.wake_at() - self._clock.monotonic())
        for component in list(self._components):
            wants = self._guarded(component, "descriptors", component.descriptors)
            if wants is not None:
                readable.extend(wants[0])
                writable.extend(wants[1])
            due = self._guarded(component, "next_turn", component.next_turn)
            if due is not None:
                seconds = min(seconds, (due - now).total_seconds())
        self._ready = self._wakeup.wait(seconds, readable, writable)

    def _reloaded(
        self, parts: DaemonParts, store: SchedulerStateStore
    ) -> tuple[DaemonParts, SchedulerStateStore]:
        self._reload = False
        self._say("RELOADING=1")
        try:
            new = self._build(self._load_config())
        except AgentError as e:
            log.error("reload refused, the running configuration is kept: %s", e)
            self._say("READY=1")
            return parts, store
        log.info("configuration reloaded from %s", new.config.source)
        self._stop_components()
        self._start_components(new)
        self.emit(self._event(EventKind.RELOADED, source=str(new.config.source)))
        self._dispatch()
        self._say("READY=1")
        return new, self._state_store(new.config)

    # -- components (agent/components.py) ----------------------------------------------------

    def _start_components(self, parts: DaemonParts) -> None:
        for component in parts.components:
            self._components.append(component)
            self._guarded(component, "start", partial(component.start, self))  # or removed
        self._dispatch()

    def _stop_components(self) -> None:
        components, self._components = self._components, []
        for component in components:
            try:
                component.stop()
            except Exception:  # stopping the others matters more
                log.exception("component %s did not stop cleanly", component.name)

    def _turn_components(self) -> None:
        readable, writable = self._ready
        self._ready = (set(), set())
        now = self._clock.now()
        for component in list(self._components):
            wants = self._guarded(component, "descriptors", component.descriptors)
            if wants is None:
                continue
            mine_r = readable.intersection(wants[0])
            mine_w = writable.intersection(wants[1])
            self._guarded(component, "turn", partial(component.turn, now, mine_r, mine_w))
            self._dispatch()  # what it did reaches the others before their turns

    def _guarded(self, component: Component, what: str, call: Callable[[], _R]) -> _R | None:
        """Run a component's method; one that fails is stopped, the loop goes on without it
        (an AgentError is an expected refusal, anything else is a bug: logged with its trace)."""
        try:
            return call()
        except AgentError as e:
            log.error("%s stopped: %s failed: %s", component.name, what, e)
        except Exception:  # the identity must outlive a broken component
            log.exception("%s stopped: %s raised", component.name, what)
        if component in self._components:
            self._components.remove(component)
            with contextlib.suppress(Exception):
                component.stop()
        return None

    def _dispatch(self) -> None:
        """Give each queued event to every component (events they emit meanwhile included)."""
        while self._events:
            event = self._events.pop(0)
            for component in list(self._components):
                self._guarded(component, "on_event", partial(component.on_event, event))

    def _event(self, kind: str, **detail: Scalar) -> Event:
        return Event(kind=kind, at=self._clock.now(), detail=detail)

    # -- the Host protocol (agent/components.py) ----------------------------------------------

    def emit(self, event: Event) -> None:
        self._events.append(event)  # every call into a component is followed by a dispatch

    def request_renewal(self) -> None:
        self._renewal_requested = True
        self._wakeup.poke()

    def request_reload(self) -> None:
        self._reload = True
        self._wakeup.poke()

    def snapshot(self) -> Snapshot:
        now = self._clock.now()
        if self._view is None:
            raise RuntimeError("snapshot() before the first turn")
        current, state, decision = self._view
        identity = None
        if current is not None:
            c = current.certificate
            identity = IdentitySummary(
                generation=current.generation,
                serial=f"{c.serial_number:x}",
                not_before=c.not_valid_before_utc,
                not_after=c.not_valid_after_utc,
            )
        statuses: dict[str, dict[str, Scalar]] = {}
        for component in self._components:
            got = self._guarded(component, "status", component.status)
            if got is not None:
                statuses[component.name] = dict(got)
        return Snapshot(
            now=now,
            started_at=self._started_at,
            identity=identity,
            next_action=decision.action.value,
            next_at=decision.at,
            reason=decision.reason,
            clock_trusted=decision.action is not Action.WAIT,
            consecutive_failures=state.history.failures,
            last_attempt=state.history.last_attempt,
            last_success=state.last_success,
            last_error=state.last_error,
            last_disposition=state.last_disposition,
            renewal_requested=self._renewal_requested,
            components=statuses,
            attempt_in_progress="" if self._in_flight is None else self._in_flight.action.value,
        )

    def _requested(self, decision: Decision, now: datetime) -> Decision:
        if decision.action is Action.WAIT:  # no trustworthy clock: nothing can be checked
            message = f"not attempted: {decision.reason}"
            finished = self._event(
                EventKind.ATTEMPT_FINISHED, action="renew", ok=False, requested=True,
                disposition="clock", message=message,
            )  # fmt: skip
            self.emit(finished)
            self._dispatch()
            return decision
        log.info("%s requested now (scheduled: %s)", decision.action.value, decision.reason)
        return Decision(decision.action, now, "requested")

    # -- deciding and acting ------------------------------------------------------------------

    def _current(self, parts: DaemonParts) -> Identity | None:
        try:
            return parts.identities.current()
        except AgentError as e:  # damaged: the enroller repairs it (falls back or re-enrolls)
            log.warning("the current identity cannot be read (%s): enrolling repairs it", e)
            return None

    def _decide(
        self,
        parts: DaemonParts,
        state: SchedulerState,
        current: Identity | None,
        now: datetime,
    ) -> Decision:
        cert = None
        if current is not None:
            c = current.certificate
            cert = CertFacts(c.not_valid_before_utc, c.not_valid_after_utc, c.serial_number)
        return decide(
            cert=cert,
            device_id=parts.config.device.id,
            history=state.history,
            now=now,
            clock_floor=clock_floor(state, self._build_time),
            bootstrap_available=parts.bootstrap_available,
            policy=parts.policy,
        )

    def _begin(
        self,
        parts: DaemonParts,
        store: SchedulerStateStore,
        state: SchedulerState,
        decision: Decision,
        now: datetime,
        requested: bool,
    ) -> SchedulerState:
        """Record the attempt, tell the components, start it. The loop goes on while it works
        (the control socket answers, the channel keeps its keepalive) until it is over."""
        action = decision.action.value
        log.info("%s: %s", action, decision.reason)
        self._say(f"STATUS={action}: {decision.reason}")
        state = store.save(record_attempt(state, now), now)  # before any network use
        # before the TPM and the network are used: a component may free what it holds
        self.emit(self._event(EventKind.ATTEMPT_STARTED, action=action, reason=decision.reason))
        self._dispatch()
        try:
            self._in_flight = _InFlight(parts.enroller.start(action), decision.action, requested)
        except AgentError as e:  # it could not start: over at once
            self._in_flight = _InFlight(_Failed(e), decision.action, requested)
            return self._finish(parts, store, state)
        return state

    def _finish(
        self, parts: DaemonParts, store: SchedulerStateStore, state: SchedulerState
    ) -> SchedulerState:
        flight = self._in_flight
        assert flight is not None and flight.attempt.over
        self._in_flight = None
        action = flight.action.value
        try:
            result = flight.attempt.outcome()
        except AgentError as e:
            disposition = classify(e)
            failure = Failure.SECURITY if disposition.kind.security else Failure.RETRYABLE
            # the server's wait counts from when its answer came, not from when we began
            until = disposition.until(self._clock.now(), maximum_seconds=MAX_RETRY_AFTER_SECONDS)
            log.warning("%s failed (%s): %s", action, disposition.kind.value, e)
            state = record_failure(
                state,
                failure=failure,
                message=str(e),
                disposition=disposition.kind.value,
                retry_after_until=until,
            )
            finished: dict[str, Scalar] = {
                "ok": False, "disposition": disposition.kind.value, "message": str(e),
            }  # fmt: skip
            if flight.action is Action.RENEW:
                self.emit(self._event(EventKind.ROTATION_FAILED, **finished))
        else:
            issued = result.identity.certificate
            state = record_success(state, self._clock.now(), issued.not_valid_before_utc)
            log.info(
                "identity generation %d is current: serial %x, valid until %s",
                result.identity.generation, issued.serial_number,
                issued.not_valid_after_utc.isoformat(timespec="seconds"),
            )  # fmt: skip
            finished = {"ok": True, "disposition": "ok", "message": ""}
            if result.changed:
                kind = EventKind.ROTATED if flight.action is Action.RENEW else EventKind.ENROLLED
                news = self._event(
                    kind, generation=result.identity.generation, action=action,
                    serial=f"{issued.serial_number:x}",
                    not_after=issued.not_valid_after_utc.isoformat(timespec="seconds"),
                )  # fmt: skip
                self.emit(news)
                self._run_hooks(parts, result)
        state = store.save(state, self._clock.now())
        finished_event = self._event(
            EventKind.ATTEMPT_FINISHED, action=action, requested=flight.requested, **finished
        )
        self.emit(finished_event)
        self._dispatch()
        current = self._current(parts)  # the components' view of what happened
        self._view = (current, state, self._decide(parts, state, current, self._clock.now()))
        return state

    def _run_hooks(self, parts: DaemonParts, result: Attempted) -> None:
        identity = result.identity
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LC_ALL": "C",
            "DEVID_CERT": str(identity.cert_file),
            "DEVID_KEY": str(identity.key_file),
            "DEVID_CHAIN": str(identity.chain_file),
            "DEVID_FULLCHAIN": str(identity.directory / "fullchain.pem"),
            "DEVID_GENERATION": str(identity.generation),
        }
        hooks = parts.config.hooks
        for argv in hooks.post_rotate:
            try:
                done = subprocess.run(
                    list(argv), env=env, capture_output=True, text=True, errors="replace",
                    timeout=hooks.timeout_seconds, check=False, stdin=subprocess.DEVNULL,
                )  # fmt: skip
            except (OSError, subprocess.TimeoutExpired) as e:
                log.warning("post-rotate hook %s failed: %s", argv[0], e)
                continue
            output = " ".join((done.stdout + done.stderr).split())[:HOOK_OUTPUT_CHARS]
            if done.returncode != 0:
                log.warning("post-rotate hook %s exited %d: %s", argv[0], done.returncode, output)
            else:
                log.info("post-rotate hook %s done%s", argv[0], f": {output}" if output else "")

    # -- systemd ------------------------------------------------------------------------------

    def _say(self, *fields: str) -> None:
        try:
            self._notify(*fields)
        except OSError as e:  # never fatal: the service must go on without systemd
            if not self._notify_failing:  # once, not at every turn, until it is heard again
                log.warning("cannot notify systemd (reported once until it works again): %s", e)
            self._notify_failing = True
        else:
            if self._notify_failing:
                log.info("systemd is notified again")
            self._notify_failing = False


def _describe(current: Identity | None) -> str:
    if current is None:
        return "not enrolled"
    end = current.certificate.not_valid_after_utc
    return f"identity generation {current.generation}, valid until {end:%Y-%m-%dT%H:%M:%SZ}"


def _status_line(
    current: Identity | None, state: SchedulerState, decision: Decision, now: datetime
) -> str:
    wait = _duration(decision.at - now)
    if decision.action is Action.WAIT:
        return f"waiting for a trustworthy clock: {decision.reason}"
    what = _describe(current)
    if state.history.failures:
        return (
            f"{what}; {decision.action.value} failing ({state.history.failures} in a row: "
            f"{state.last_error}); next attempt in {wait}"
        )
    return f"{what}; {decision.action.value} in {wait}"


def _duration(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"
