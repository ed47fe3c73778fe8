"""`devid-agent doctor`: check that this device can run the agent, and say what to fix.

Each check prints one line: `ok`, `warn` (works, but weaker than it should be) or `FAIL` with
what to do. `--json` prints the same as a list of objects. Exit 0 unless a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass

from agent.cli import one_line
from agent.cli.config_cmd import add_config_option
from agent.config import Config, CounterKind, KeyStoreKind, config_path, load_config
from agent.errors import AgentError


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # "ok" | "warn" | "fail"
    detail: str


def check_state_dir(config: Config) -> Finding:
    path = config.paths.state_dir
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Finding("state_dir", "warn", f"{path} does not exist yet (created at enrollment)")
    except OSError as e:
        return Finding("state_dir", "fail", f"cannot stat {path}: {e.strerror}")
    if st.st_uid != os.geteuid():  # hal.storage.ensure_private_dir refuses it too
        return Finding(
            "state_dir",
            "fail",
            f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}); run "
            "devid-agent as its owner, or chown it",
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        return Finding(
            "state_dir", "fail", f"{path} is mode {stat.S_IMODE(st.st_mode):04o}; want 0700"
        )
    return Finding("state_dir", "ok", f"{path} (0700)")


def check_key_store(config: Config) -> Finding:
    if config.keys.store is KeyStoreKind.SOFTWARE:
        return Finding(
            "key_store", "warn", "software keys: the private key is a file root can copy"
        )
    from agent.wiring import describe_tpm, tpm_object_memory_hint, tpm_objects

    info = describe_tpm(config)
    loaded, slots = tpm_objects(config)
    about = (
        f"TPM at {config.tpm.tcti}: manufacturer {info['manufacturer']}, "
        f"spec revision {info['revision']}, {loaded} of {slots} object slots in use"
    )
    if loaded + 2 > slots:  # a key load needs two free slots (docs/tpm.md)
        hint = tpm_object_memory_hint()
        return Finding("key_store", "fail", f"{about}: no key can be loaded{hint}")
    return Finding("key_store", "ok", about)


def check_tls_provider(config: Config) -> Finding:
    if config.keys.store is KeyStoreKind.SOFTWARE:
        return Finding("tls_provider", "ok", "not needed for software keys")
    from agent.wiring import prepare_tls

    info = prepare_tls(config)
    assert info is not None
    return Finding("tls_provider", "ok", f"tpm2 OpenSSL provider {info.version} at {info.path}")


def check_tpm_owner_auth(config: Config) -> Finding:
    uses_tpm = config.keys.store is not KeyStoreKind.SOFTWARE or (
        config.firmware.compatible and config.firmware.counter is CounterKind.TPM
    )
    if not uses_tpm:
        return Finding("tpm_owner_auth", "ok", "no TPM in use")
    from agent.wiring import tpm_owner_auth_set

    if tpm_owner_auth_set(config):
        return Finding("tpm_owner_auth", "ok", "the TPM owner hierarchy has an auth value")
    return Finding(
        "tpm_owner_auth",
        "warn",
        "the TPM owner auth is empty: anyone who can open the TPM (group tss) can define and "
        "undefine NV indexes, so could squat the anti-rollback counter's index (refused, but "
        "firmware updates stop) or raise the counter and lock updates out; set one with "
        "`tpm2_changeauth -c owner` and name its file in firmware.counter_owner_auth_file",
    )


CHECKS: list[Callable[[Config], Finding]] = [
    check_state_dir,
    check_key_store,
    check_tpm_owner_auth,
    check_tls_provider,
]


def run_checks(config: Config) -> list[Finding]:
    findings = []
    for check in CHECKS:
        name = check.__name__.removeprefix("check_")
        try:
            findings.append(check(config))
        except AgentError as e:
            findings.append(Finding(name, "fail", str(e)))
    return findings


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    doctor = subparsers.add_parser("doctor", help="check the TPM, TLS provider, state and config")
    add_config_option(doctor)
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        path = config_path(args.config)
        config = load_config(path)
        findings = [Finding("config", "ok", str(path)), *run_checks(config)]
    except AgentError as e:
        findings = [Finding("config", "fail", str(e))]
    if args.json:
        print(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        for f in findings:
            status = f.status.upper() if f.status == "fail" else f.status
            print(f"{status:<4}  {f.check}: {one_line(f.detail)}")
    return 1 if any(f.status == "fail" for f in findings) else 0
