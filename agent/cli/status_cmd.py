"""`devid-agent status [--json]`: the identity, a pending EST request and the firmware slots.

When the service runs (`control.enabled`), its answer over the control socket is printed: the
same model, collected in the daemon, with what only it knows (`service`: next renewal and why,
last attempt, failures, clock trusted, its components). Otherwise the disk is read and the
`service` part says why the service did not answer. `agent.control.client.fast_main` answers
`status` from the service before this module (or anything heavy) is imported.

Exit status (`agent.status_codes`, README "Exit codes"): 0 healthy; 81 not enrolled; 86 identity
unusable; 82 expired; 85 renewal failing with little lifetime left; 87 service not running
(when expected); 74 a part could not be read. Collection is `agent.status.StatusCollector`,
built by `agent.wiring`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from agent.cli.config_cmd import add_config_option

if TYPE_CHECKING:  # imported when the command runs, not to build --help
    from agent.config import Config
    from agent.status import AgentStatus, ServiceStatus


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = subparsers.add_parser(
        "status",
        help="identity, pending enrollment and firmware state",
        description="Exit 0 healthy, 81 not enrolled, 86 identity unusable (unreadable, or not "
        "yet valid), 82 expired, 85 renewal failing with less than "
        "status.renewal_failing_share of the lifetime left, 87 service not running (with "
        "control.enabled), 74 a part could not be read.",
    )
    add_config_option(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=run)


def collect(config: Config) -> AgentStatus:
    from agent.wiring import status_collector

    return status_collector(config).collect()


def ask_service(config: Config) -> tuple[dict[str, Any] | None, ServiceStatus | None]:
    """The service's status answer, or (None, why it gave none); (None, None) when the service
    is not expected (control.enabled = false)."""
    if not config.control.enabled:
        return None, None
    from agent.control import client  # json, socket: only when there is a service to ask
    from agent.status import ServiceStatus

    failure = client.prior
    if failure is None:
        try:
            answer = client.ask(
                str(config.paths.run_dir / client.SOCKET_NAME),
                "status",
                timeout=client.status_timeout(config.control.request_timeout_seconds),
                trusted_uids=client.trusted_server_uids(str(config.paths.state_dir)),
            )
            if {"code", "text", "status"} <= set(answer):
                return answer, None
            failure = client.Unavailable("error", "the service's status answer is incomplete")
        except (client.Unavailable, client.Refused) as e:
            failure = e
    if isinstance(failure, client.Refused):  # it runs, but will not tell this user
        return None, ServiceStatus(running=True, detail=f"it refused: {failure.message}")
    if failure.state == "forbidden":  # a socket this user may not use: not ours to judge
        return None, ServiceStatus(running=True, detail=failure.detail)
    return None, ServiceStatus(running=False, detail=failure.detail)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from agent.config import config_path, load_config
    from agent.status_codes import status_code
    from agent.wiring import renewal_facts

    config = load_config(config_path(args.config))
    answer, service = ask_service(config)
    if answer is not None:
        if args.json:
            import json

            print(json.dumps(answer["status"], indent=2, sort_keys=True))
        else:
            print(answer["text"])
        return int(answer["code"])
    status = replace(collect(config), service=service)
    if args.json:
        import json

        print(json.dumps(status.to_dict(), indent=2, sort_keys=True))
    else:
        print(status.to_text())
    share = config.status.renewal_failing_share
    # the scheduler's record matters only to a valid identity (renewal failing): the other
    # states decide the code alone, and need not read it
    facts = renewal_facts(config) if status.identity.state == "valid" else None
    return status_code(status, facts, failing_share=share)
