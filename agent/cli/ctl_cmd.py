"""`devid-agent ctl ping|reload|reconnect`: ask the running service over its control socket
(docs/control.md). `renew` and `status` go through the service by themselves when it runs.

`ask_service` is what `renew` and `ctl` share: the answer's result, None when the service does
not run (no socket, or nobody listens), and `ServiceAnswer` with its exit code for a refusal
(77), an attempt that failed (the code of its disposition, as `renew` alone would exit; 74 when
the service's clock is not trustworthy) or a socket that does not answer (87).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from agent.cli import EXIT_SERVICE_NOT_RUNNING
from agent.cli.config_cmd import add_config_option
from agent.errors import AgentError

if TYPE_CHECKING:
    from agent.config import Config


class ServiceAnswer(AgentError):
    """The service refused, failed, or does not answer; `exit_code` says which (README)."""

    def __init__(self, message: str, *, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def ask_service(config: Config, op: str, *, timeout: float) -> dict[str, Any] | None:
    from agent.cli import EXIT_HAL, EXIT_REJECTED
    from agent.control import client

    path = str(config.paths.run_dir / client.SOCKET_NAME)
    try:
        return client.ask(
            path,
            op,
            timeout=timeout,
            trusted_uids=client.trusted_server_uids(str(config.paths.state_dir)),
        )
    except client.Unavailable as e:
        if e.state in ("absent", "refused"):
            return None
        if e.state == "forbidden":
            raise ServiceAnswer(f"the running service: {e.detail}", exit_code=EXIT_REJECTED) from e
        raise ServiceAnswer(
            f"the service does not answer: {e.detail}", exit_code=EXIT_SERVICE_NOT_RUNNING
        ) from e
    except client.Refused as e:
        if e.code == "forbidden":
            raise ServiceAnswer(
                f"the running service refused: {e.message}", exit_code=EXIT_REJECTED
            ) from e
        if e.code == "attempt_failed":
            raise ServiceAnswer(
                f"{op} through the running service failed: {e.message}",
                exit_code=_disposition_code(e.disposition),
            ) from e
        raise ServiceAnswer(
            f"the running service answered {op} with {e.code}: {e.message}", exit_code=EXIT_HAL
        ) from e


def _disposition_code(disposition: str) -> int:
    """The exit code `renew` alone would have given for the service's disposition."""
    from agent.cli import EXIT_CODES, EXIT_HAL
    from agent.errors import Kind

    kind = {k.value: k for k in Kind}.get(disposition)
    return EXIT_CODES[kind] if kind is not None else EXIT_HAL  # "clock": not trustworthy


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ctl = subparsers.add_parser("ctl", help="ask the running service: ping, reload, reconnect")
    add_config_option(ctl)
    ctl.add_argument(
        "op",
        choices=["ping", "reload", "reconnect"],
        help="ping: is it there; reload: re-read the config (as SIGHUP); reconnect: the MQTT "
        "channel reconnects",
    )
    ctl.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent.cli import fail
    from agent.config import config_path, load_config

    config = load_config(config_path(args.config))
    try:
        timeout = max(5.0, config.control.request_timeout_seconds)
        answer = ask_service(config, args.op, timeout=timeout)
    except ServiceAnswer as e:
        fail(str(e))
        return e.exit_code
    if answer is None:
        fail(f"the service is not running (no answer at {config.paths.run_dir}/control.sock)")
        return EXIT_SERVICE_NOT_RUNNING
    shown = {"ping": "pong", "reload": "reload requested", "reconnect": "reconnect requested"}
    print(f"{shown[args.op]} ({', '.join(f'{k}={v}' for k, v in sorted(answer.items()))})")
    return 0
