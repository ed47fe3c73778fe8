"""`devid-agent firmware sign|verify|install|status|commit|rollback|crl refresh`.

Run by OTA hooks as root. Exit status: 0 done; 65 the bundle (or a CRL) was refused (signature,
chain, compatible, downgrade, truncated or altered payload) or commit found the booted slot
changed; 69 a download failed (unreachable, timed out, cut short, 4xx/5xx, redirect to http);
74 bootloader env, slot, bundle file, counter or state failed (a corrupt env, writing the booted
slot); 78 configuration. One line on stderr says why (docs/firmware.md, contrib/README.md).
A bundle named by an https:// URL is streamed (agent.firmware.fetch, built in agent.wiring).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from agent.cli.config_cmd import add_config_option

if TYPE_CHECKING:  # each command imports what it uses when it runs (start-up time)
    from agent.config import Config

#: a bundle is public (it is signed, not secret) and nobody else may change it
BUNDLE_MODE = 0o644


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fw = subparsers.add_parser("firmware", help="signed A/B firmware: sign, verify, install, ...")
    actions = fw.add_subparsers(dest="firmware_command", metavar="ACTION", required=True)

    sign = actions.add_parser("sign", help="(vendor) sign IMAGE into a bundle")
    sign.add_argument(
        "--key", required=True, type=Path, action="append",
        help="signer private key (PEM); repeat --key/--cert for each signer",
    )  # fmt: skip
    sign.add_argument("--cert", required=True, type=Path, action="append",
                      help="signer certificate (PEM), one per --key")  # fmt: skip
    sign.add_argument(
        "--chain", type=Path, action="append",
        help="intermediate certificates (PEM): once for all signers, or once per signer",
    )  # fmt: skip
    sign.add_argument(
        "--key-password-file", type=Path, help="file holding the key's passphrase (encrypted PEM)"
    )
    sign.add_argument("--compatible", required=True, help="hardware compatible string")
    sign.add_argument("--version", required=True, dest="fw_version", help="firmware version")
    sign.add_argument("--security-version", required=True, type=int, help="anti-rollback version")
    sign.add_argument("--hash", default="sha256", choices=("sha256", "sha384"))
    sign.add_argument("-o", "--output", required=True, type=Path, help="bundle to write")
    sign.add_argument("image", type=Path, metavar="IMAGE")
    sign.set_defaults(func=run_sign)

    verify = actions.add_parser(
        "verify", help="verify BUNDLE (file, '-' = stdin, https:// URL); change nothing"
    )
    verify.add_argument("bundle", metavar="BUNDLE")
    install = actions.add_parser(
        "install", help="verify BUNDLE (file, '-', https:// URL streamed) into the inactive slot"
    )
    install.add_argument("bundle", metavar="BUNDLE")
    install.add_argument("--slot", help="target slot (default: the one not booted)")
    status = actions.add_parser("status", help="slots, versions, tries, committed version")
    status.add_argument("--json", action="store_true", help="print JSON")
    commit = actions.add_parser("commit", help="mark the booted slot good; raise the counter")
    rollback = actions.add_parser("rollback", help="boot the other good slot next")
    crl = actions.add_parser("crl", help="certificate revocation lists of the firmware PKI")
    crl_actions = crl.add_subparsers(dest="crl_command", metavar="ACTION", required=True)
    refresh = crl_actions.add_parser(
        "refresh", help="fetch, check and store the CRLs (distribution points, crl_urls)"
    )
    for parser, func in (
        (refresh, run_crl_refresh),
        (verify, run_verify),
        (install, run_install),
        (status, run_status),
        (commit, run_commit),
        (rollback, run_rollback),
    ):
        add_config_option(parser)
        parser.set_defaults(func=func)


def _config(args: argparse.Namespace) -> Config:
    from agent.config import config_path, load_config

    return load_config(config_path(args.config))


def _is_url(name: str) -> bool:
    return name.startswith(("https://", "http://"))


@contextlib.contextmanager
def _open_bundle(name: str, config: Config) -> Iterator[BinaryIO]:
    from agent.errors import StorageError

    if _is_url(name):  # streamed, never copied to disk (docs/firmware.md "Install from HTTPS")
        from agent.wiring import bundle_opener

        with bundle_opener(config)(name) as stream:
            yield stream
        return
    if name == "-":
        yield sys.stdin.buffer
        return
    try:
        f = open(name, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise StorageError(f"cannot open bundle {name}: {e.strerror}") from e
    with f:
        yield f


def run_sign(args: argparse.Namespace) -> int:
    from agent.clock import SystemClock
    from agent.errors import ConfigError, StorageError
    from agent.firmware.manifest import parse_manifest
    from agent.firmware.sign import Signer, make_manifest, write_bundle
    from hal.storage import read_bytes, temp_name

    password = None
    if args.key_password_file is not None:
        password = read_bytes(args.key_password_file, limit=4096).rstrip(b"\n")
    keys: list[Path] = args.key
    certs: list[Path] = args.cert
    chains: list[Path] = args.chain or []
    if len(certs) != len(keys) or len(chains) not in (0, 1, len(keys)):
        raise ConfigError(
            f"firmware sign: {len(keys)} --key, {len(certs)} --cert and {len(chains)} --chain: "
            "give one --cert per --key, and --chain once or once per --key"
        )
    signers = [
        Signer.from_files(
            key, cert, (chains[i if len(chains) > 1 else 0] if chains else None), password=password
        )
        for i, (key, cert) in enumerate(zip(keys, certs, strict=True))
    ]
    manifest = make_manifest(
        args.image,
        compatible=args.compatible,
        version=args.fw_version,
        security_version=args.security_version,
        created=SystemClock().now(),
        hash_algorithm=args.hash,
    )
    # Validate what we are about to sign exactly as a device will parse it.
    parse_manifest(manifest.to_bytes(), max_payload_bytes=1 << 62)
    out: Path = args.output
    tmp = temp_name(out)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(tmp, flags, BUNDLE_MODE), "wb") as f:
            os.fchmod(f.fileno(), BUNDLE_MODE)  # whatever the umask
            write_bundle(args.image, f, manifest, signers)
        os.replace(tmp, out)
    except OSError as e:
        raise StorageError(f"cannot write {out}: {e.strerror}") from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    print(f"signed {args.image} as {out}: {manifest.compatible} {manifest.version} "
          f"security_version {manifest.security_version}")  # fmt: skip
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from agent.wiring import firmware_device

    config = _config(args)
    device = firmware_device(config)
    with _open_bundle(args.bundle, config) as stream:
        manifest = device.verify(stream)
    print(
        f"OK: {manifest.compatible} {manifest.version} security_version "
        f"{manifest.security_version}, {manifest.payload_size} bytes"
    )
    return 0


def run_install(args: argparse.Namespace) -> int:
    from agent.wiring import firmware_device

    config = _config(args)
    device = firmware_device(config)
    with _open_bundle(args.bundle, config) as stream:
        slot, manifest = device.install(stream, slot=args.slot)
    print(f"installed {manifest.version} into slot {slot}; it boots next")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from agent.wiring import firmware_status

    status = firmware_status(_config(args))
    if args.json:
        import json

        print(json.dumps(status.to_dict(), indent=2, sort_keys=True))
    else:
        print(status.to_text())
    return 0


def run_commit(args: argparse.Namespace) -> int:
    from agent.wiring import firmware_device

    result = firmware_device(_config(args)).commit()
    note = ""
    if result.fell_back_from:
        note = f"; the bootloader had fallen back from slot {result.fell_back_from}"
    print(f"committed slot {result.slot}; security version {result.security_version}{note}")
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    from agent.wiring import firmware_device

    slot = firmware_device(_config(args)).rollback()
    print(f"slot {slot} boots next")
    return 0


def run_crl_refresh(args: argparse.Namespace) -> int:
    """One line per CRL: stored (with its next update) on stdout, refused on stderr; the exit
    code is that of the first refusal (65 a bad CRL, 69 a download failure)."""
    from agent.cli import exit_code_for, one_line
    from agent.wiring import crl_refresh

    code = 0
    for outcome in crl_refresh(_config(args)):
        if outcome.error is None:
            print(outcome.line())
        else:
            print(f"devid-agent: {one_line(outcome.line())}", file=sys.stderr)
            code = code or exit_code_for(outcome.error)
    return code
