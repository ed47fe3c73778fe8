"""The attempt process: one enroll, renew, bootstrap or /cacerts fetch for the service, then
exit.

Started by agent/attempt_process.py with one JSON request on stdin; answers one JSON line on
stdout; logs to stderr (the service's, so the journal's). It is the only process of the service
that imports the TPM stack and the enrollment code. SIGTERM or SIGINT (the service stopping)
ends an EST request in progress at once (the transport watches the Interrupt) and the attempt
ends as the one-shot commands' would: the identity whole, the TPM objects flushed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from agent.attempt_process import (
    ACTIONS,
    PROTOCOL,
    answer_certificates,
    answer_failed,
    answer_ok,
)
from agent.clock import Interrupt
from agent.errors import AgentError, classify

if TYPE_CHECKING:
    from cryptography import x509

    from agent.config import Config

log = logging.getLogger("agent.attempt")

MAX_REQUEST_BYTES = 2 * 1024 * 1024  # the config text (at most 1 MiB) and a few fields
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """SIGTERM when the service dies: a clean end, not an orphan finishing a rotation alone."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("cannot ask to end with the service (prctl: errno %d)", ctypes.get_errno())


def read_request(data: bytes) -> dict[str, Any]:
    """The service's request, checked (ValueError names what is wrong)."""
    if len(data) > MAX_REQUEST_BYTES:
        raise ValueError(f"request larger than {MAX_REQUEST_BYTES} bytes")
    request = json.loads(data)
    if not isinstance(request, dict) or request.get("protocol") != PROTOCOL:
        raise ValueError("not a request of this protocol")
    kinds = {"action": str, "config": str, "source": str, "broker_connected": bool, "parent": int}
    for key, kind in kinds.items():
        if not isinstance(request.get(key), kind):
            raise ValueError(f"{key}: missing or not a {kind.__name__}")
    if request.get("anchor") is not None and not isinstance(request["anchor"], str):
        raise ValueError("anchor: not a path")
    if request["action"] == "cacerts" and request.get("anchor") is None:
        raise ValueError("anchor: missing for cacerts")
    if request["action"] not in ACTIONS:
        raise ValueError(f"action: {request['action']!r} is not one of {', '.join(ACTIONS)}")
    return request


def attempt(request: dict[str, Any], interrupt: Interrupt) -> dict[str, Any]:
    from agent import wiring
    from agent.config import parse_config

    try:
        config = parse_config(request["config"], source=Path(request["source"]))
        logging.getLogger().setLevel(config.logging.level.upper())
        if request["action"] == "cacerts":
            source = wiring.ca_source(config, interrupt=interrupt)
            certs = source.fetch_cacerts(Path(request["anchor"]))
            return answer_certificates([_pem(c) for c in certs])
        if request["action"] == "check-key":
            return _check_key(config)
        attempts = wiring.attempt_enroller(
            config, interrupt=interrupt, broker_connected=request["broker_connected"]
        )
        if request["action"] == "renew":
            result = attempts.renew()
        else:
            result = attempts.enroll(force=request["action"] == "bootstrap")
    except AgentError as e:
        return answer_failed(str(e), classify(e))
    return answer_ok(generation=result.identity.generation, changed=result.changed)


def _check_key(config: Config) -> dict[str, Any]:
    """The current identity's key loads and signs for its certificate."""
    from agent import wiring
    from agent.errors import NotEnrolled

    identity = wiring.identity_store(config).current()
    if identity is None:
        raise NotEnrolled("no identity to check the key of")
    wiring.identity_key_check(config)(identity)
    return answer_ok(generation=identity.generation, changed=False)


def _pem(cert: x509.Certificate) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.PEM).decode("ascii")


def main() -> int:
    from agent.wiring import service_log_handler

    logging.getLogger().addHandler(service_log_handler())
    _die_with_parent()
    interrupt = Interrupt()

    def stop(signum: int, frame: FrameType | None) -> None:
        interrupt.trip()  # a flag and a byte: the transport ends the request in progress

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        request = read_request(sys.stdin.buffer.read(MAX_REQUEST_BYTES + 1))
    except (ValueError, RecursionError) as e:
        log.error("attempt process: the service's request is unusable: %s", e)
        return 2
    if request["parent"] != os.getppid():
        log.error("attempt process: the service that asked (pid %d) is gone", request["parent"])
        return 3
    answer = attempt(request, interrupt)
    from agent.wiring import crash_points_passed

    answer["crash_points"] = crash_points_passed()
    sys.stdout.buffer.write(json.dumps(answer).encode() + b"\n")
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
