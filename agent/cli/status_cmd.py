"""`devid-agent status [--json]`: the identity, a pending EST request and the firmware slots.

Exit status 0 when the identity is valid and every part could be read, 1 otherwise, so it serves
as a health check. Collection is `agent.status.StatusCollector`, built by `agent.wiring`.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from agent.cli.config_cmd import add_config_option

if TYPE_CHECKING:  # imported when the command runs, not to build --help
    from agent.config import Config
    from agent.status import AgentStatus


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = subparsers.add_parser("status", help="identity, pending enrollment and firmware state")
    add_config_option(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=run)


def collect(config: Config) -> AgentStatus:
    from agent.wiring import status_collector

    return status_collector(config).collect()


def run(args: argparse.Namespace) -> int:
    from agent.config import config_path, load_config

    status = collect(load_config(config_path(args.config)))
    if args.json:
        print(json.dumps(status.to_dict(), indent=2, sort_keys=True))
    else:
        print(status.to_text())
    return 0 if status.healthy else 1
