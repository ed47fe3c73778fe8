"""`devid-agent run`: the long-running service (agent/daemon.py), as systemd starts it.

Logs go to stderr, one line per event at `logging.level` (or debug with -v); when stderr is the
journal (`$JOURNAL_STREAM`) each line carries its `<N>` priority so levels survive.
"""

from __future__ import annotations

import argparse
import logging

from agent.cli.config_cmd import add_config_option


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = subparsers.add_parser("run", help="the service: enroll, then renew before expiry")
    add_config_option(run)
    run.set_defaults(func=run_daemon)


def run_daemon(args: argparse.Namespace) -> int:
    from agent.config import config_path, load_config
    from agent.wiring import daemon, service_log_handler

    path = config_path(args.config)
    config = load_config(path)  # refuse a bad config before anything starts, in one line
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(service_log_handler())
    root.setLevel(logging.DEBUG if args.verbose else config.logging.level.upper())
    return daemon(config, load=lambda: load_config(path)).run()
