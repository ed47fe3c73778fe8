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

import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.clock import Interrupt
from agent.config import Config
from agent.errors import Disposition, Kind, Reported
from agent.identity import Identity, IdentityStore
from hal import faults

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger(__name__)

PROTOCOL = 1
ACTIONS = ("enroll", "renew", "bootstrap", "cacerts", "check-key")
#: the longest answer read from a child (it is one short JSON line)
MAX_ANSWER_BYTES = 64 * 1024
#: an error message longer than this is cut (they are one line; a server's text is bounded too)
MAX_MESSAGE_CHARS = 4096
#: how long a key check (or a successful attempt, which proved the key) vouches for the key
KEY_CHECK_SECONDS = 300.0
#: after the service's stop reached the child, how long it may take to end cleanly
STOP_GRACE_SECONDS = 10.0


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


class AttemptProcess:
    """The daemon's attempts (agent/daemon.py `Attempts`), each run by a child process."""

    def __init__(
        self,
        *,
        config: Config,
        identities: IdentityStore,
        broker_connected: Callable[[], bool] = lambda: False,
        interrupt: Interrupt | None = None,
        argv: tuple[str, ...] | None = None,
        stop_grace_seconds: float = STOP_GRACE_SECONDS,
    ) -> None:
        self._config = config
        self._identities = identities
        self._broker_connected = broker_connected
        self._interrupt = interrupt
        self._argv = argv or (sys.executable, "-P", "-m", "agent.attempt_worker")
        self._grace = stop_grace_seconds
        #: (generation, monotonic time) of the last proof that the current key loads and signs
        self._key_vouched: tuple[int, float] | None = None

    def renew(self) -> Attempted:
        return self._attempted(self._run("renew", broker_connected=self._broker_connected()))

    def enroll(self, *, force: bool = False) -> Attempted:
        action = "bootstrap" if force else "enroll"
        return self._attempted(self._run(action, broker_connected=self._broker_connected()))

    def fetch_cacerts(self, anchor: Path) -> list[x509.Certificate]:
        """/cacerts over TLS verified against `anchor` (agent/est/ca_source.py), fetched by a
        child, so the EST client never lives in this process."""
        from cryptography import x509

        pems = self._run("cacerts", anchor=anchor).get("certificates")
        if not isinstance(pems, list) or not pems:
            raise Reported("the attempt process answered /cacerts with no certificates",
                           Disposition(Kind.INTERNAL))  # fmt: skip
        try:
            return [x509.load_pem_x509_certificate(pem.encode()) for pem in pems]
        except ValueError as e:
            raise Reported(f"the attempt process answered /cacerts with a bad PEM: {e}",
                           Disposition(Kind.INTERNAL)) from e  # fmt: skip

    def check_key(self, identity: Identity) -> None:
        """KeyStoreError-like Reported unless `identity`'s key loads and signs for its
        certificate: checked by a child (the TPM stack is not in this process), at most every
        KEY_CHECK_SECONDS; a successful attempt proved it too. A failure is never cached."""
        now = time.monotonic()
        vouched = self._key_vouched
        if vouched and vouched[0] == identity.generation and now - vouched[1] < KEY_CHECK_SECONDS:
            return
        answer = self._run("check-key")  # the current identity's key: `identity`, unless it moved
        if answer.get("generation") == identity.generation:
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
        self._key_vouched = (current.generation, time.monotonic())  # proven over mutual TLS
        return Attempted(identity=current, changed=answer["changed"])

    def _run(self, action: str, **fields: Any) -> dict[str, Any]:
        """One child for `action`: its successful answer, or Reported with its disposition."""
        request = request_document(self._config, action, **fields)
        data, returncode = self._communicate(request, self._environment())
        answer: dict[str, Any] | None = None
        try:
            answer = parse_answer(data, returncode)
        finally:  # a crash point there is a power cut here too (tests only)
            faults.child_ended(returncode, answer.get("crash_points", 0) if answer else 0)
        if not answer["ok"]:
            disposition = Disposition(Kind(answer["kind"]), answer["wait_seconds"])
            raise Reported(answer["message"], disposition)
        return answer

    def _environment(self) -> Mapping[str, str]:
        import agent

        env = dict(os.environ)
        # the same code as this process, wherever it was imported from (`-P`: never the cwd)
        home = str(Path(agent.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (home, env.get("PYTHONPATH")) if p)
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):  # systemd hears the service
            env.pop(name, None)
        env.update(faults.child_environment())
        return env

    def _communicate(self, request: bytes, env: Mapping[str, str]) -> tuple[bytes, int]:
        try:
            child = subprocess.Popen(
                self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                close_fds=True,
            )  # fmt: skip
        except OSError as e:
            raise Reported(
                f"cannot start the attempt process {self._argv[0]}: {e}",
                Disposition(Kind.LOCAL_FAULT),
            ) from e
        assert child.stdin is not None and child.stdout is not None
        try:
            with child.stdin:
                child.stdin.write(request)  # read at once by the child, before anything else
        except BrokenPipeError:
            pass  # it ended already: its exit status says why
        out = bytearray()
        stop_at: float | None = None
        with child.stdout:
            fd = child.stdout.fileno()
            while True:
                waits = [fd]
                if self._interrupt is not None and stop_at is None:
                    waits.append(self._interrupt.fileno())
                timeout = None if stop_at is None else max(0.0, stop_at - time.monotonic())
                ready, _, _ = select.select(waits, [], [], timeout)
                if not ready:  # the grace after the stop is over
                    log.warning("the attempt process did not end on SIGTERM: killed")
                    child.kill()
                    break
                if fd not in ready:  # the service is stopping: so does the attempt
                    child.send_signal(signal.SIGTERM)
                    stop_at = time.monotonic() + self._grace
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                out += chunk
                if len(out) > MAX_ANSWER_BYTES:
                    child.kill()
                    return b"", child.wait()
        return bytes(out), child.wait()
