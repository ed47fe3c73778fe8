"""`devid-agent` command line: one process per command, one clear line per failure.

Each command lives in its own module with a `register(subparsers)` function; the error tree maps
to exit codes here (documented in the README).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from agent import __version__
from agent.errors import (
    AgentError,
    ConfigError,
    EnrollmentError,
    EnrollmentPending,
    HalError,
    TransportError,
    TrustError,
)

# Exit codes, after sysexits.h where one fits (README: "Exit codes").
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_TRUST = 65  # EX_DATAERR: a signature, chain or version check failed
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: server unreachable, network failed
EXIT_HAL = 74  # EX_IOERR: TPM, bootloader env or disk failed
EXIT_PENDING = 75  # EX_TEMPFAIL: accepted, come back later (202 Retry-After)
EXIT_BAD_RESPONSE = 76  # EX_PROTOCOL: the server answered with something unusable
EXIT_REJECTED = 77  # EX_NOPERM: the server refused us (401/403/4xx)
EXIT_CONFIG = 78  # EX_CONFIG

Command = Callable[[argparse.Namespace], int]


def exit_code_for(error: AgentError) -> int:
    if isinstance(error, ConfigError):
        return EXIT_CONFIG
    if isinstance(error, EnrollmentPending):
        return EXIT_PENDING
    if isinstance(error, TransportError):
        return EXIT_UNAVAILABLE
    if isinstance(error, EnrollmentError):
        return (
            EXIT_REJECTED
            if error.status is not None and 400 <= error.status < 500
            else EXIT_BAD_RESPONSE
        )
    if isinstance(error, TrustError):
        return EXIT_TRUST
    if isinstance(error, HalError):
        return EXIT_HAL
    return EXIT_FAILURE


Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _modules() -> list[Register]:
    """Each command module's register(); imported here so `--help` lists every command."""
    from agent.cli import config_cmd, doctor_cmd, enroll_cmd, firmware_cmd, status_cmd

    return [
        config_cmd.register,
        doctor_cmd.register,
        enroll_cmd.register,
        status_cmd.register,
        firmware_cmd.register,
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devid-agent",
        description="Device identity agent: TPM keys, EST enrollment, mTLS, signed A/B firmware.",
    )
    parser.add_argument("--version", action="version", version=f"devid-agent {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $DEVID_AGENT_CONFIG or /etc/devid-agent/config.toml)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _modules():
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="devid-agent: %(levelname)s: %(message)s",
    )
    func: Command | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return func(args)
    except AgentError as e:
        print(f"devid-agent: {e}", file=sys.stderr)
        return exit_code_for(e)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
