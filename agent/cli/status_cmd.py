"""`devid-agent status [--json]`: the identity, a pending EST request and the firmware slots.

Exit status 0 when the identity is valid and every part could be read, 1 otherwise, so it serves
as a health check. A part that cannot be read is reported, not fatal: status must work on a
device that is half broken, because that is when people ask for it.
"""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from typing import TYPE_CHECKING, Any

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
    from agent.clock import SystemClock
    from agent.errors import AgentError
    from agent.est.pending import PendingStore
    from agent.layout import PENDING_FILE_NAME
    from agent.status import (
        AgentStatus,
        IdentityStatus,
        PendingStatus,
        identity_status,
        pending_status,
    )
    from agent.wiring import identity_store

    errors: list[str] = []
    state_dir = config.paths.state_dir
    try:
        current = identity_store(config).current()
        skew = timedelta(seconds=config.est.clock_skew_seconds)
        identity = identity_status(current, now=SystemClock().now(), skew=skew)
    except AgentError as e:
        identity = IdentityStatus(state="unreadable")
        errors.append(str(e))
    pending: PendingStatus | None = None
    try:
        pending = pending_status(PendingStore(path=state_dir / PENDING_FILE_NAME).load())
    except AgentError as e:
        errors.append(str(e))
    firmware: dict[str, Any] | None = None
    if config.firmware.compatible:
        from agent.firmware.wiring import firmware_device

        try:
            firmware = firmware_device(config).status().to_dict()
        except AgentError as e:
            errors.append(str(e))
    return AgentStatus(
        device_id=config.device.id,
        config=str(config.source),
        identity=identity,
        est_pending=pending,
        firmware=firmware,
        errors=tuple(errors),
    )


def run(args: argparse.Namespace) -> int:
    from agent.config import config_path, load_config

    status = collect(load_config(config_path(args.config)))
    if args.json:
        print(json.dumps(status.to_dict(), indent=2, sort_keys=True))
    else:
        print(status.to_text())
    return 0 if status.healthy else 1
