"""`devid-agent audit verify [--firmware]`: check the audit trail's hash chain.

Exit 0 when every line chains to the one before it (rotated files included); 84 (EXIT_AUDIT_BROKEN)
with one line naming the file and the first line that does not, when a line was removed, edited,
reordered or torn. `--firmware` checks root's trail of firmware events (`firmware.state_dir`).
"""

from __future__ import annotations

import argparse

from agent.cli.config_cmd import add_config_option


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = subparsers.add_parser("audit", help="the hash-chained audit trail")
    actions = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    verify = actions.add_parser("verify", help="check the chain; exit 84 naming the first bad line")
    verify.add_argument(
        "--firmware", action="store_true", help="root's firmware trail (firmware.state_dir)"
    )
    add_config_option(verify)
    verify.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    from agent.cli import EXIT_AUDIT_BROKEN, fail
    from agent.config import config_path, load_config
    from agent.wiring import firmware_audit_log, service_audit_log

    config = load_config(config_path(args.config))
    log = firmware_audit_log(config) if args.firmware else service_audit_log(config)
    report = log.verify()
    if report.problem is not None:
        fail(f"audit trail broken: {report.problem.describe()}")
        return EXIT_AUDIT_BROKEN
    print(
        f"OK: {report.lines} records in {log.where} (and its rotated files), "
        f"head seq {report.head.seq} sha256 {report.head.hash}"
    )
    return 0
