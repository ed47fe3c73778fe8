"""`devid-agent` command line: one process per command, one clear line per failure.

Each command lives in its own module with a `register(subparsers)` function; the error tree maps
to exit codes here (documented in the README).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import cast

from agent import __version__
from agent.errors import AgentError, Kind, TransportError, classify

# Exit codes, after sysexits.h where one fits (README: "Exit codes"; EXIT_CODES_HELP below).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_TRUST = 65  # EX_DATAERR: a signature, chain or version check failed
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: server unreachable, network failed
EXIT_HAL = 74  # EX_IOERR: TPM, bootloader env or disk failed
EXIT_PENDING = 75  # EX_TEMPFAIL: come back at the printed time (202, or 5xx with Retry-After)
EXIT_BAD_RESPONSE = 76  # EX_PROTOCOL: the server answered with something unusable
EXIT_REJECTED = 77  # EX_NOPERM: the server refused us (401/403/4xx), or a conflicting request
EXIT_CONFIG = 78  # EX_CONFIG
EXIT_BUSY = 80  # another devid-agent process holds the lock: retry in a moment
EXIT_NOT_ENROLLED = 81  # no identity: run `devid-agent enroll`
EXIT_IDENTITY_EXPIRED = 82  # the identity expired and cannot renew: run `devid-agent enroll`
EXIT_CLIENT_REJECTED = 83  # the EST server's TLS alert rejected our client certificate
EXIT_AUDIT_BROKEN = 84  # `audit verify`: the hash chain is broken (a line removed or edited)
EXIT_RENEWAL_FAILING = 85  # `status`: renewals fail and little of the lifetime is left
EXIT_IDENTITY_UNUSABLE = 86  # `status`: the identity is unreadable or not yet valid
EXIT_SERVICE_NOT_RUNNING = 87  # `status`, `ctl`: the service does not run or does not answer
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of our output went away (`| head -0`)

#: one exit code per disposition kind (agent.errors.classify)
EXIT_CODES: dict[Kind, int] = {
    Kind.RETRY_SOON: EXIT_BUSY,
    Kind.RETRY_LATER: EXIT_UNAVAILABLE,
    Kind.WAIT_UNTIL: EXIT_PENDING,
    Kind.BAD_RESPONSE: EXIT_BAD_RESPONSE,
    Kind.REFUSED: EXIT_REJECTED,
    Kind.CONFLICT: EXIT_REJECTED,
    Kind.NOT_ENROLLED: EXIT_NOT_ENROLLED,
    Kind.IDENTITY_EXPIRED: EXIT_IDENTITY_EXPIRED,
    Kind.CLIENT_REJECTED: EXIT_CLIENT_REJECTED,
    Kind.SECURITY_EVENT: EXIT_TRUST,
    Kind.LOCAL_FAULT: EXIT_HAL,
    Kind.CONFIG: EXIT_CONFIG,
    Kind.INTERNAL: EXIT_FAILURE,
}

EXIT_CODES_HELP = """\
exit codes:
  0    success (or already enrolled)
  1    other failure (a bug: run with -v)
  2    usage error
  65   a trust check failed (signature, chain, validity, downgrade, fingerprint): do not retry
  69   EST or download server unreachable, timed out, cut short or 5xx: retry later
  74   TPM, bootloader environment, slot, counter or disk failure, or an unsafe request
  75   come back later: request pending (202) or the server named a time (Retry-After)
  76   the EST server answered with something unusable
  77   refused by the EST server (401/403/4xx), or another request is pending: needs a human
  78   configuration error: needs a human
  80   busy: another devid-agent process holds the lock; retry in a moment
  81   not enrolled: run `devid-agent enroll`
  82   the identity expired and cannot renew: run `devid-agent enroll`
  83   the EST server rejected our client certificate (TLS alert): security event
  84   audit verify: the audit trail's hash chain is broken (security event)
  85   status: renewal failing with less than status.renewal_failing_share of the lifetime left
  86   status: the identity is unusable (key or certificate unreadable, or not yet valid)
  87   status, ctl: the service is not running or its control socket does not answer
  130  interrupted
  141  our output pipe was closed by its reader
"""

log = logging.getLogger(__name__)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Command = Callable[[argparse.Namespace], int]


def exit_code_for(error: BaseException) -> int:
    return EXIT_CODES[classify(error).kind]


Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


#: each command, and the module whose register() adds it (imported only when needed)
COMMAND_MODULES = {
    "audit": "agent.cli.audit_cmd",
    "config": "agent.cli.config_cmd",
    "doctor": "agent.cli.doctor_cmd",
    "enroll": "agent.cli.enroll_cmd",
    "renew": "agent.cli.enroll_cmd",
    "run": "agent.cli.run_cmd",
    "status": "agent.cli.status_cmd",
    "firmware": "agent.cli.firmware_cmd",
    "metrics": "agent.cli.metrics_cmd",
    "ctl": "agent.cli.ctl_cmd",
}
_HELP = ("-h", "--help")


def _modules(names: Sequence[str] | None = None) -> list[Register]:
    """The register() of the modules named (default: every command's, so `--help` lists all)."""
    import importlib

    wanted = dict.fromkeys(COMMAND_MODULES.values() if names is None else names)
    return [importlib.import_module(name).register for name in wanted]


def _command_in(argv: Sequence[str]) -> str | None:
    """The command `argv` names, or None when it names none or asks for the top-level help.

    The options before the command are the top-level ones (`--config PATH`, `-v`), so the first
    word that is neither one of them nor `--config`'s value is the command."""
    words = iter(argv)
    for word in words:
        if word in _HELP:
            return None
        if word == "--config":
            next(words, None)
        elif not word.startswith("-"):
            return word if word in COMMAND_MODULES else None
    return None


def _terminal_columns() -> int:
    """shutil.get_terminal_size's answer without importing shutil (argparse would, at every
    start, for the width of a help text that is rarely printed)."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class _Parser(argparse.ArgumentParser):
    def _get_formatter(self) -> argparse.HelpFormatter:
        make: Callable[..., argparse.HelpFormatter] = self.formatter_class
        return make(prog=self.prog, width=_terminal_columns() - 2)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given the arguments, with only the named command's subparser (its module
    alone imported: a one-shot command starts fast), else with every command."""
    parser = _Parser(
        prog="devid-agent",
        description="Device identity agent: TPM keys, EST enrollment, mTLS, signed A/B firmware.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"devid-agent {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $DEVID_AGENT_CONFIG or /etc/devid-agent/config.toml)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    # its parsers are _Parser too (type(parser)); the commands' register() see ArgumentParser
    subparsers = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", metavar="COMMAND"),
    )
    command = None if argv is None else _command_in(argv)
    if command is None and argv is not None and "--version" in argv and not set(_HELP) & set(argv):
        return parser  # argparse prints the version and exits before a command is looked at
    for register in _modules(None if command is None else [COMMAND_MODULES[command]]):
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # e.g. `devid-agent --help | head -0`: argparse wrote into it
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except SystemExit:  # argparse's --help, --version, usage errors: flush while we can tell
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
            return EXIT_BROKEN_PIPE
        raise


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="devid-agent: %(levelname)s: %(message)s",
    )
    func: Command | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        sys.stdout.flush()
        return EXIT_USAGE
    try:
        code = func(args)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return code
    except AgentError as e:
        disposition = classify(e)
        message = str(e)
        if isinstance(e, TransportError) and disposition.wait_seconds is not None:
            message += f" (the server asks us to retry after {disposition.wait_seconds:.0f} s)"
        _fail(message)
        return EXIT_CODES[disposition.kind]
    except KeyboardInterrupt:
        _fail("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as e:  # a disk or device error no module wrapped: still one line
        log.debug("unwrapped OSError", exc_info=True)
        where = f": {e.filename}" if e.filename is not None else ""
        _fail(f"{e.strerror or e}{where}")
        return exit_code_for(e)
    except Exception as e:  # a bug: one line (the traceback with -v), never a bare traceback
        log.debug("unexpected error", exc_info=True)
        _fail(f"unexpected error {type(e).__name__}: {e} (run with -v for details)")
        return exit_code_for(e)


def one_line(text: str) -> str:
    """`text` with control characters (newlines from a server's message, ...) escaped."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def fail(message: str) -> None:
    """One line on stderr, `devid-agent: ...` (for commands that report and return a code)."""
    _fail(message)


def _fail(message: str) -> None:
    with contextlib.suppress(OSError):  # stderr is gone too; the exit code still tells
        print(f"devid-agent: {one_line(message)}", file=sys.stderr, flush=True)


def _silence_stdout() -> None:
    """After EPIPE on stdout, point it at /dev/null so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
