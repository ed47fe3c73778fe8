"""`devid-agent config check`: parse the config and say OK or the one line that is wrong."""

from __future__ import annotations

import argparse
import sys


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """Let `--config` also follow the subcommand (`devid-agent config check --config F`)."""
    parser.add_argument(
        "--config", metavar="PATH", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = subparsers.add_parser("config", help="work with the configuration file")
    actions = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate the config file; print OK or what is wrong")
    add_config_option(check)
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from agent.config import config_path, load_config

    path = config_path(args.config)
    config = load_config(path)
    # the identity group exists; as root, the paths root's firmware commands would refuse
    from agent.wiring import check_host

    check_host(config)
    if config.mqtt.enabled and config.mqtt.insecure_unsigned_commands:
        print(
            "warning: mqtt.insecure_unsigned_commands is on: the device accepts commands without "
            "a signature from whoever can publish on its commands topic (labs only)",
            file=sys.stderr,
        )
    print("OK")
    return 0
