"""The service's attempts (enroll, renew, bootstrap) and its /cacerts fetches each in a process
of their own.

The long-lived service stays small and clean: the TPM stack (tpm2-pytss), the CSR and
csrattrs code (pyasn1) and the enrollment flow are imported only by the attempt process
(agent/attempt_worker.py), which ends with its attempt, so a crash, a hang or a leak in a
renewal ends with it too (certmonger runs its CA helpers the same way). The measurement that
chose this is in bench/bench_daemon.py and docs/daemon.md.

One attempt is one child: `python -P -m agent.attempt_worker`, given one JSON request on stdin
(the config text the service runs under, not the file as it is by then; the action; whether the
MQTT channel is connected, so that the broker's proof of the new identity is required) and
answering one JSON line on stdout. Its log lines go to the service's stderr (the journal). The
answer carries the outcome's disposition as the child classified it (agent/errors.py
`Reported`), so the scheduler treats it exactly as an error raised in its own process.

The service's stop (its Interrupt, tripped by SIGTERM) reaches the child as SIGTERM, which ends
an EST request in progress at once and lets the child exit cleanly; after a grace period it is
killed. The child also gets SIGTERM when the service dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from agent.clock import Clock, Interrupt, SystemClock
from agent.config import Config
from agent.errors import Busy, Disposition, Kind, Reported
from agent.identity import Identity, IdentityStore

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger(__name__)
T = TypeVar("T")

PROTOCOL = 1
#: what the scheduler starts (agent/daemon.py), and what else a child does for the service
ATTEMPTS = ("enroll", "renew", "bootstrap")
ACTIONS = (*ATTEMPTS, "cacerts", "check-key")
#: the longest answer read from a child (it is one short JSON line)
MAX_ANSWER_BYTES = 64 * 1024
#: an error message longer than this is cut (they are one line; a server's text is bounded too)
MAX_MESSAGE_CHARS = 4096
#: how long a key check (or a successful attempt, which proved the key) vouches for the key
KEY_CHECK_SECONDS = 300.0
#: deadlines of the other children (an attempt's is renewal.attempt_timeout_seconds)
CACERTS_DEADLINE_SECONDS = 120.0
KEY_CHECK_DEADLINE_SECONDS = 60.0
#: after the service's stop reached the child, how long it may take to end cleanly
STOP_GRACE_SECONDS = 10.0


class ChildFaults(Protocol):
    """The deterministic crash points of the tests (hal/faults.py, given by agent/wiring.py),
    counted across the service and its children as one power cut ends both."""

    def child_environment(self) -> dict[str, str]: ...

    def child_ended(self, returncode: int, points_passed: int) -> None: ...


class _NoFaults:
    def child_environment(self) -> dict[str, str]:
        return {}

    def child_ended(self, returncode: int, points_passed: int) -> None:
        pass


NO_FAULTS = _NoFaults()


@dataclass(frozen=True)
class Attempted:
    """A successful attempt: the identity now current, and whether the attempt changed it."""

    identity: Identity
    changed: bool


def request_document(
    config: Config,
    action: str,
    *,
    broker_connected: bool = False,
    anchor: Path | None = None,
) -> bytes:
    if action not in ACTIONS:
        raise ValueError(f"unknown attempt action {action!r}")
    return json.dumps(
        {
            "protocol": PROTOCOL,
            "action": action,
            "config": config.text,
            "source": str(config.source),
            "broker_connected": broker_connected,
            "anchor": None if anchor is None else str(anchor),
            "parent": os.getpid(),
        }
    ).encode()


def answer_ok(*, generation: int, changed: bool) -> dict[str, Any]:
    return {"protocol": PROTOCOL, "ok": True, "generation": generation, "changed": changed}


def answer_certificates(pems: list[str]) -> dict[str, Any]:
    return {"protocol": PROTOCOL, "ok": True, "certificates": pems}


def answer_failed(message: str, disposition: Disposition) -> dict[str, Any]:
    return {
        "protocol": PROTOCOL,
        "ok": False,
        "message": message[:MAX_MESSAGE_CHARS],
        "kind": disposition.kind.value,
        "wait_seconds": disposition.wait_seconds,
    }


def _ended(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_answer(data: bytes, returncode: int) -> dict[str, Any]:
    """The child's answer, checked, or Reported (INTERNAL) naming what was wrong with it."""
    where = f"the attempt process ({_ended(returncode)})"
    if not data.strip():
        raise Reported(f"{where} ended without an answer", Disposition(Kind.INTERNAL))
    try:
        answer = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise Reported(f"{where} answered with no JSON: {e}", Disposition(Kind.INTERNAL)) from e
    if not isinstance(answer, dict) or answer.get("protocol") != PROTOCOL:
        raise Reported(f"{where} answered in another protocol", Disposition(Kind.INTERNAL))
    ok = answer.get("ok")
    fine = (
        (isinstance(answer.get("generation"), int) and isinstance(answer.get("changed"), bool))
        or (
            isinstance(answer.get("certificates"), list)
            and all(isinstance(pem, str) for pem in answer["certificates"])
        )
        if ok is True
        else ok is False
        and isinstance(answer.get("message"), str)
        and answer.get("kind") in {k.value for k in Kind}
        and (answer.get("wait_seconds") is None or _finite(answer["wait_seconds"]))
    ) and isinstance(answer.get("crash_points", 0), int)
    if not fine:
        raise Reported(f"{where} answered with malformed fields", Disposition(Kind.INTERNAL))
    return answer


class Running(Generic[T]):
    """One child at work: its answer read as it comes (the loop waits on `fileno()` with the rest),
    killed past its deadline, stopped on request."""

    def __init__(
        self,
        child: subprocess.Popen[bytes],
        *,
        action: str,
        deadline_seconds: float,
        grace_seconds: float,
        finish: Callable[[dict[str, Any]], T],
        clock: Clock,
        faults: ChildFaults,
    ) -> None:
        assert child.stdout is not None
        self._clock = clock
        self._faults = faults
        self.action = action
        self._child = child
        self._stdout = child.stdout
        self._out = bytearray()
        self._deadline_seconds = deadline_seconds
        self._deadline = clock.monotonic() + deadline_seconds
        self._grace = grace_seconds
        self._stop_at: float | None = None
        self._overdue = False
        self._over = False
        self._finish = finish

    @property
    def over(self) -> bool:
        return self._over

    def fileno(self) -> int:
        return self._stdout.fileno()

    def wake_at(self) -> float:
        """The monotonic time by which `pump` must run even if the child says nothing."""
        return self._deadline if self._stop_at is None else self._stop_at

    def pump(self) -> bool:
        """Read what the child wrote, without blocking; True once it is over (its answer
        complete, or killed: past its deadline, past the grace after a stop, or too talkative)."""
        if self._over:
            return True
        now = self._clock.monotonic()
        if now >= self.wake_at():
            if self._stop_at is not None:
                log.warning("the attempt process (%s) did not end on SIGTERM: killed", self.action)
                self._end(kill=True)
                return True
            # past its deadline: SIGTERM first, so that a child waiting on the network ends
            # cleanly and flushes its TPM objects (a bare TPM keeps a killed process's)
            self._overdue = True
            log.warning("the attempt process (%s) took longer than %.0f s: stopping it",
                        self.action, self._deadline_seconds)  # fmt: skip
            self.stop()
        while select.select([self._stdout], [], [], 0)[0]:
            chunk = os.read(self.fileno(), 65536)
            if not chunk:
                self._end(kill=False)
                return True
            self._out += chunk
            if len(self._out) > MAX_ANSWER_BYTES:
                self._out.clear()
                self._end(kill=True)
                return True
        return False

    def stop(self) -> None:
        """The service is stopping: SIGTERM ends the child's EST request at once and lets it exit
        cleanly; killed if it is not over within the grace period."""
        if self._stop_at is None and not self._over:
            with contextlib.suppress(ProcessLookupError):
                self._child.send_signal(signal.SIGTERM)
            self._stop_at = self._clock.monotonic() + self._grace

    def wait(self, interrupt: Interrupt | None = None) -> T:
        """Block until it is over (a tripped `interrupt` stops it); its outcome."""
        while not self.pump():
            waits: list[Any] = [self._stdout]
            if interrupt is not None and self._stop_at is None:
                waits.append(interrupt)
            timeout = max(0.0, self.wake_at() - self._clock.monotonic())
            ready, _, _ = select.select(waits, [], [], timeout)
            if interrupt is not None and interrupt in ready:
                self.stop()
        return self.outcome()

    def outcome(self) -> T:
        """What the child achieved, or Reported with the disposition it gave (once over)."""
        assert self._over, "outcome() before the attempt is over"
        returncode = self._child.wait()
        overdue = Reported(
            f"the attempt process ({self.action}) took longer than "
            f"{self._deadline_seconds:.0f} s and was stopped",
            Disposition(Kind.RETRY_LATER),
        )
        answer: dict[str, Any] | None = None
        try:
            answer = parse_answer(bytes(self._out), returncode)
        except Reported as e:
            if self._overdue:
                raise overdue from e
            raise
        finally:  # a crash point there is a power cut here too (tests only)
            self._faults.child_ended(returncode, answer.get("crash_points", 0) if answer else 0)
        if not answer["ok"]:
            if self._overdue:  # its own message would be the stop's ("interrupted")
                raise overdue
            disposition = Disposition(Kind(answer["kind"]), answer["wait_seconds"])
            raise Reported(answer["message"], disposition)
        return self._finish(answer)  # done as it was stopped: what it did counts

    def _end(self, *, kill: bool) -> None:
        if kill:
            with contextlib.suppress(ProcessLookupError):
                self._child.kill()
        self._stdout.close()
        self._over = True


class AttemptProcess:
    """The daemon's attempts (agent/daemon.py `Attempts`), each run by a child process; one
    child at a time (they share the TPM and its few object slots)."""

    def __init__(
        self,
        *,
        config: Config,
        identities: IdentityStore,
        broker_connected: Callable[[], bool] = lambda: False,
        interrupt: Interrupt | None = None,
        argv: tuple[str, ...] | None = None,
        stop_grace_seconds: float = STOP_GRACE_SECONDS,
        clock: Clock | None = None,
        faults: ChildFaults | None = None,
    ) -> None:
        self._config = config
        self._clock = clock or SystemClock()
        self._faults = faults or NO_FAULTS
        self._identities = identities
        self._broker_connected = broker_connected
        self._interrupt = interrupt
        self._argv = argv or (sys.executable, "-P", "-m", "agent.attempt_worker")
        self._grace = stop_grace_seconds
        self._deadline = config.renewal.attempt_timeout_seconds
        est = config.est
        self._cacerts_deadline = max(
            CACERTS_DEADLINE_SECONDS, 2 * (est.connect_timeout_seconds + est.read_timeout_seconds)
        )
        self._running: Running[Any] | None = None
        #: (generation, monotonic time) of the last proof that the current key loads and signs
        self._key_vouched: tuple[int, float] | None = None

    @property
    def busy(self) -> bool:
        """A child is at work (until its outcome was taken or it is over)."""
        return self._running is not None and not self._running.over

    def start(self, action: str) -> Running[Attempted]:
        """An enroll, renew or bootstrap, started; the daemon's loop pumps it with the rest."""
        if action not in ATTEMPTS:
            raise ValueError(f"not an attempt: {action!r}")
        return self._start(action, self._attempted, broker_connected=self._broker_connected())

    def renew(self) -> Attempted:
        return self.start("renew").wait(self._interrupt)

    def enroll(self, *, force: bool = False) -> Attempted:
        return self.start("bootstrap" if force else "enroll").wait(self._interrupt)

    def fetch_cacerts(self, anchor: Path) -> list[x509.Certificate]:
        """/cacerts over TLS verified against `anchor` (agent/est/ca_source.py), fetched by a
        child, so the EST client never lives in this process. Busy while an attempt runs."""
        running = self._start("cacerts", _certificates, anchor=anchor,
                              deadline_seconds=self._cacerts_deadline)  # fmt: skip
        return running.wait(self._interrupt)

    def check_key(self, identity: Identity) -> None:
        """KeyStoreError-like Reported unless `identity`'s key loads and signs for its
        certificate: checked by a child (the TPM stack is not in this process), at most every
        KEY_CHECK_SECONDS; a successful attempt proved it too. A failure is never remembered.
        While an attempt runs, the TPM is its: KeyNotChecked (status says "not checked")."""
        from agent.status import KeyNotChecked

        now = self._clock.monotonic()
        vouched = self._key_vouched
        if vouched and vouched[0] == identity.generation and now - vouched[1] < KEY_CHECK_SECONDS:
            return
        if self.busy:
            raise KeyNotChecked("an attempt is using the TPM: the key is checked after it")
        running = self._start("check-key", lambda answer: answer.get("generation"),
                              deadline_seconds=KEY_CHECK_DEADLINE_SECONDS)  # fmt: skip
        if running.wait(self._interrupt) == identity.generation:  # unless the identity moved
            self._key_vouched = (identity.generation, now)

    def _attempted(self, answer: dict[str, Any]) -> Attempted:
        if not isinstance(answer.get("generation"), int):
            raise Reported("the attempt process answered without an identity",
                           Disposition(Kind.INTERNAL))  # fmt: skip
        current = self._identities.current()
        if current is None or current.generation != answer["generation"]:
            raise Reported(
                f"the attempt process reported generation {answer['generation']} current, "
                f"but {current.generation if current else 'none'} is",
                Disposition(Kind.INTERNAL),
            )
        self._key_vouched = (current.generation, self._clock.monotonic())  # proven over mTLS
        return Attempted(identity=current, changed=answer["changed"])

    def _start(
        self,
        action: str,
        finish: Callable[[dict[str, Any]], T],
        *,
        deadline_seconds: float | None = None,
        **fields: Any,
    ) -> Running[T]:
        if self.busy:
            raise Busy(f"the service's attempt process is at work ({self._running_action()}): "
                       f"{action} later")  # fmt: skip
        request = request_document(self._config, action, **fields)
        child = self._spawn(request)
        running = Running(
            child, action=action, deadline_seconds=deadline_seconds or self._deadline,
            grace_seconds=self._grace, finish=finish, clock=self._clock, faults=self._faults,
        )  # fmt: skip
        self._running = running
        return running

    def _running_action(self) -> str:
        return self._running.action if self._running is not None else "none"

    def _environment(self) -> Mapping[str, str]:
        import agent

        env = dict(os.environ)
        # the same code as this process, wherever it was imported from (`-P`: never the cwd)
        home = str(Path(agent.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (home, env.get("PYTHONPATH")) if p)
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):  # systemd hears the service
            env.pop(name, None)
        env.update(self._faults.child_environment())
        return env

    def _spawn(self, request: bytes) -> subprocess.Popen[bytes]:
        try:
            child = subprocess.Popen(
                self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                env=self._environment(), close_fds=True,
            )  # fmt: skip
        except OSError as e:
            raise Reported(
                f"cannot start the attempt process {self._argv[0]}: {e}",
                Disposition(Kind.LOCAL_FAULT),
            ) from e
        assert child.stdin is not None
        try:
            with child.stdin:
                child.stdin.write(request)  # read at once by the child, before anything else
        except BrokenPipeError:
            pass  # it ended already: its exit status says why
        os.set_blocking(child.stdout.fileno(), False)  # type: ignore[union-attr]
        return child


def _certificates(answer: dict[str, Any]) -> list[x509.Certificate]:
    from cryptography import x509

    pems = answer.get("certificates")
    if not isinstance(pems, list) or not pems:
        raise Reported("the attempt process answered /cacerts with no certificates",
                       Disposition(Kind.INTERNAL))  # fmt: skip
    try:
        return [x509.load_pem_x509_certificate(pem.encode()) for pem in pems]
    except ValueError as e:
        raise Reported(f"the attempt process answered /cacerts with a bad PEM: {e}",
                       Disposition(Kind.INTERNAL)) from e  # fmt: skip
