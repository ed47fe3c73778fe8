"""`devid-agent status [--json]`: the identity, a pending EST request and the firmware slots.

Exit status (`agent.status_codes`, README "Exit codes"): 0 healthy; 81 not enrolled; 86 identity
unusable; 82 expired; 85 renewal failing with little lifetime left; 74 a part could not be
read. Collection is `agent.status.StatusCollector`, built by `agent.wiring`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from agent.cli.config_cmd import add_config_option

if TYPE_CHECKING:  # imported when the command runs, not to build --help
    from agent.config import Config
    from agent.status import AgentStatus


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = subparsers.add_parser(
        "status",
        help="identity, pending enrollment and firmware state",
        description="Exit 0 healthy, 81 not enrolled, 86 identity unusable (unreadable, or not "
        "yet valid), 82 expired, 85 renewal failing with less than "
        "status.renewal_failing_share of the lifetime left, 74 a part could not be read.",
    )
    add_config_option(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=run)


def collect(config: Config) -> AgentStatus:
    from agent.wiring import status_collector

    return status_collector(config).collect()


def run(args: argparse.Namespace) -> int:
    from agent.config import config_path, load_config
    from agent.status_codes import status_code
    from agent.wiring import renewal_facts

    config = load_config(config_path(args.config))
    status = collect(config)
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
