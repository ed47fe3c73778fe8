"""`devid-agent enroll` and `devid-agent renew`: get (or refresh) the operational certificate."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from agent.cli.config_cmd import add_config_option

if TYPE_CHECKING:  # the enroll machinery is imported when a command runs, not to build --help
    from agent.enroll import Enroller, EnrollResult


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    enroll = subparsers.add_parser(
        "enroll", help="get the operational certificate from the EST server (first identity)"
    )
    enroll.add_argument(
        "--force", action="store_true", help="enroll even if a valid identity is already in place"
    )
    add_config_option(enroll)
    enroll.set_defaults(func=run_enroll)
    renew = subparsers.add_parser(
        "renew", help="re-enroll now with the current identity (new key by default)"
    )
    renew.add_argument(
        "--reuse-key", action="store_true", help="keep the current key instead of a new one"
    )
    add_config_option(renew)
    renew.set_defaults(func=run_renew)


def _enroller(args: argparse.Namespace) -> Enroller:
    from agent.config import config_path, load_config
    from agent.wiring import enroller

    return enroller(load_config(config_path(args.config)))


def run_enroll(args: argparse.Namespace) -> int:
    result = _enroller(args).enroll(force=args.force)
    print(describe(result, "enrolled" if result.changed else "already enrolled (use --force)"))
    return 0


def run_renew(args: argparse.Namespace) -> int:
    """Through the running service when there is one (so two writers never race: the service
    renews at its next turn, proves the new identity and runs its hooks), else here."""
    from agent.config import config_path, load_config

    config = load_config(config_path(args.config))
    if config.control.enabled:
        from agent.cli import fail
        from agent.cli.ctl_cmd import ServiceAnswer, ask_service

        try:
            answer = ask_service(config, "renew", timeout=RENEW_TIMEOUT_SECONDS)
        except ServiceAnswer as e:
            fail(str(e))
            return e.exit_code
        if answer is not None:
            if args.reuse_key:
                print("note: the service renews with a new key (--reuse-key applies alone)")
            print(f"renewed through the running service ({answer.get('action', 'renew')})")
            return 0
    from agent.wiring import enroller

    result = enroller(config).renew(reuse_key=args.reuse_key)
    print(describe(result, "renewed"))
    return 0


#: how long `renew` waits for the service's attempt (each of its steps has its own timeouts)
RENEW_TIMEOUT_SECONDS = 600.0


def describe(result: EnrollResult, headline: str) -> str:
    identity = result.identity
    cert = identity.certificate
    where = "TPM" if identity.key_in_tpm else "software key file (not hardware-backed)"
    lines = [
        f"{headline}: generation {identity.generation}",
        f"subject:  {cert.subject.rfc4514_string()}",
        f"serial:   {cert.serial_number:x}",
        f"issuer:   {cert.issuer.rfc4514_string()}",
        f"valid:    {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} .. "
        f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
        f"key:      {where}: {identity.key_file}",
        f"cert:     {identity.cert_file}",
    ]
    if result.repair is not None:
        lines.append(f"repaired: {result.repair.describe()}")
    if result.changed:
        detail = "new key" if result.new_key else "same key"
        pop = ", proof-of-possession" if result.proof_of_possession else ""
        lines.append(f"via:      {result.tls_version}, {detail}{pop}")
    return "\n".join(lines)
