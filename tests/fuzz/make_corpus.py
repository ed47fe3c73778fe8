"""Regenerate the seed corpora in tests/fuzz/corpus/<target>/ from real samples.

    .venv/bin/python -m tests.fuzz.make_corpus [TARGET ...]     # every target by default

EST responses are captured from our HTTPS EST server (tests/support/est_server.py) over a real
TLS connection; the bundle is signed by a test vendor PKI (its root is kept in
tests/fuzz/data/firmware-anchor.pem so the bundle target verifies the seeds' signatures); the
bootloader seeds are the output of the real `fw_printenv` and `grub-editenv list`; the state
files are what the agent's own encoders write; the MQTT commands are envelopes signed by a test
command PKI (its root in tests/fuzz/data/command-anchor.pem), valid at the targets' NOW. Seeds whose name starts with `crash-` are
regression inputs from findings and are never removed by this script.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import shutil
import ssl
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.est.pending import PendingRequest
from agent.firmware import state as firmware_state
from agent.firmware.status import FirmwareStatus, SlotStatus
from agent.renewal import Failure, History
from agent.renewal_state import SchedulerState, encode_state
from tests.fuzz.targets import COMMAND_DEVICE, CORPUS, DATA, NOW, TARGETS, check
from tests.support.ca import pem
from tests.support.command_signer import CommandPki, payload, unsigned_envelope
from tests.support.est_server import EstOptions, EstServer, csrattrs_der
from tests.support.firmware import Vendor, image, make_bundle, manifest_for

ROOT = Path(__file__).resolve().parents[2]
GRUB_BLOCK = 1024


def _http(est: EstServer, method: str, path: str, body: bytes | None = None) -> bytes:
    """One request over real TLS; the response as the seeds hold it (headers, CRLF CRLF, body)."""
    ctx = ssl.create_default_context(cafile=str(est.ca_file))
    conn = http.client.HTTPSConnection("localhost", est.port, context=ctx, timeout=10)
    headers = {"Content-Type": "application/pkcs10"} if body is not None else {}
    try:
        conn.request(method, f"/.well-known/est/{path}", body=body, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        head = "".join(f"{k}: {v}\r\n" for k, v in resp.getheaders())
    finally:
        conn.close()
    return head.encode("latin-1") + b"\r\n" + payload


def _csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz-device")]))
        .sign(key, hashes.SHA256())
    )
    return base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))


def _est(seeds: dict[str, dict[str, bytes]], tmp: Path) -> None:
    with EstServer(tmp / "est", EstOptions()) as est:
        cacerts = _http(est, "GET", "cacerts")
        seeds["est_cacerts"]["server"] = cacerts
        _, _, body = cacerts.partition(b"\r\n\r\n")
        der = base64.b64decode(b"".join(body.split()))
        seeds["est_cacerts"]["binary-der"] = (
            b"Content-Type: application/pkcs7-mime\r\nContent-Transfer-Encoding: binary\r\n\r\n"
            + der
        )
        seeds["est_cacerts"]["x-pkcs7-no-type"] = (
            b"Content-Type: application/x-pkcs7-certificates\r\n\r\n" + body
        )
        seeds["est_csrattrs"]["server-trailing-garbage"] = _http(est, "GET", "csrattrs")
        est.options.csrattrs_trailing_garbage = False
        est.options.csrattrs = csrattrs_der(
            curve="secp384r1", oids=("challengePassword", "2.5.4.5", "2.5.4.3")
        )
        seeds["est_csrattrs"]["server-p384"] = _http(est, "GET", "csrattrs")
        seeds["est_enroll"]["issued"] = _http(est, "POST", "simpleenroll", _csr())
        est.options.pending = 1
        est.options.retry_after = "Tue, 01 Dec 2026 12:05:00 GMT"
        seeds["est_enroll"]["pending-202"] = _http(est, "POST", "simpleenroll", _csr())
        # the issued certificate followed by its CA: validate_issued walks the whole path
        issued = seeds["est_enroll"]["issued"].partition(b"\r\n\r\n")[2]
        leaf = base64.b64decode(b"".join(issued.split()))
        from cryptography.hazmat.primitives.serialization import pkcs7

        certs = pkcs7.load_der_pkcs7_certificates(leaf) + pkcs7.load_der_pkcs7_certificates(der)
        both = pkcs7.serialize_certificates(certs, serialization.Encoding.DER)
        seeds["est_enroll"]["issued-with-ca"] = (
            b"Content-Type: application/pkcs7-mime; smime-type=certs-only\r\n"
            b"Retry-After: 120\r\n\r\n" + base64.encodebytes(both)
        )


def _firmware(seeds: dict[str, dict[str, bytes]]) -> None:
    vendor = Vendor()
    (DATA / "firmware-anchor.pem").write_bytes(pem(vendor.root.cert))
    payload = image(256)
    manifest = dataclasses.replace(manifest_for(payload), created=NOW)
    one = make_bundle(payload, [vendor.signer], manifest)
    second = vendor.make_signer("ec-p384")
    two = make_bundle(payload, [vendor.signer, second], manifest)
    seeds["firmware_bundle"]["one-signer"] = one[:-200]  # the header and a little payload
    seeds["firmware_bundle"]["two-signers"] = two[:-200]
    seeds["firmware_manifest"]["manifest"] = manifest.to_bytes()
    seeds["firmware_manifest"]["sha384"] = manifest_for(payload, hash_algorithm="sha384").to_bytes()


def _states(seeds: dict[str, dict[str, bytes]]) -> None:
    seeds["scheduler_state"]["empty"] = encode_state(SchedulerState())
    seeds["scheduler_state"]["failing"] = encode_state(
        SchedulerState(
            history=History(
                failures=3,
                last_failure=Failure.RETRYABLE,
                last_attempt=NOW,
                retry_after_until=NOW + timedelta(minutes=5),
            ),
            last_success=NOW - timedelta(days=1),
            last_error="/simpleenroll: HTTP 503 Service Unavailable",
            last_disposition="retry_later",
            newest_not_before=NOW - timedelta(days=1),
            written_at=NOW,
        )
    )
    record = firmware_state.SlotRecord(
        state="installed",
        version="1.2.0",
        security_version=2,
        hash_algorithm="sha256",
        digest="ab" * 32,
        size=4096,
        updated="2026-12-01T12:00:00+00:00",
    )
    fw = firmware_state.FirmwareState(
        slots={"A": firmware_state.SlotRecord(state="good"), "B": record}, pending="B"
    )
    seeds["firmware_state"]["pending-B"] = firmware_state.encode_state(fw)
    seeds["firmware_state"]["empty"] = firmware_state.encode_state(firmware_state.FirmwareState())
    import json

    slot = SlotStatus(
        name="A",
        path="/dev/mmcblk0p2",
        booted=True,
        state="good",
        bootable=True,
        version="1.2.0",
        security_version=2,
        tries_left=3,
        digest="ab" * 32,
    )
    other = SlotStatus(**{**slot.__dict__, "name": "B", "booted": False, "security_version": None})
    status = FirmwareStatus(
        booted="A",
        next_boot="A",
        bootloader="uboot",
        slots=(slot, other),
        committed_security_version=2,
        counter="tpm-nv 0x1500016",
        counter_hardware_backed=True,
        pending=None,
        fell_back=False,
    )
    seeds["firmware_status"]["snapshot"] = json.dumps(status.to_dict(), indent=1).encode()
    seeds["est_pending"]["simpleenroll"] = PendingRequest(
        operation="simpleenroll",
        key_store="software",
        key_blob=b"-----BEGIN PRIVATE KEY-----\nfuzz\n-----END PRIVATE KEY-----\n",
        reused_key=False,
        csr_der=base64.decodebytes(_csr()),
        proof_of_possession=True,
        created=NOW,
        retry_at=NOW + timedelta(minutes=1),
        attempts=2,
    ).to_json()


def _commands(seeds: dict[str, dict[str, bytes]]) -> None:
    from agent.commands import replay

    pki = CommandPki(not_before=NOW - timedelta(days=1))
    (DATA / "command-anchor.pem").write_bytes(pem(pki.root.cert))
    issued = NOW - timedelta(minutes=1)
    out = seeds["mqtt_command"]
    for command, kind, alg in (("ping", "ec-p256", "ES256"), ("renew", "ec-p384", "ES384"),
                               ("status", "rsa-2048", "PS256"),
                               ("refresh-cacerts", "rsa-2048", "RS256")):  # fmt: skip
        signer = pki.signer if kind == "ec-p256" else pki.make_signer(kind)
        data = payload(device=COMMAND_DEVICE, command=command, issued_at=issued)
        out[f"{command}-{alg}"] = signer.envelope(data, alg=alg)
    root_signed = pki.make_signer(issuer=pki.root)
    out["ping-under-root"] = root_signed.envelope(payload(device=COMMAND_DEVICE, issued_at=issued))
    out["unsigned-ping"] = unsigned_envelope(payload(device=COMMAND_DEVICE, issued_at=issued))
    out["wrong-device"] = pki.signer.envelope(payload(device="gw-other", issued_at=issued))
    entries = tuple((NOW + timedelta(minutes=m), f"01J{m:02d}EXAMPLE-{m}") for m in range(3))
    seeds["command_replay_state"]["three"] = replay.encode_state(
        replay.ReplayState(entries=entries, floor=NOW)
    )
    seeds["command_replay_state"]["empty"] = replay.encode_state(replay.ReplayState())


def _config(seeds: dict[str, dict[str, bytes]]) -> None:
    seeds["config"]["example"] = (ROOT / "config.example.toml").read_bytes()
    seeds["config"]["minimal"] = (
        b'[est]\nurl = "https://est.example.net/.well-known/est"\n'
        b'trust_anchor = "/etc/devid-agent/est-ca.pem"\n'
        b'[device]\nid = "gw-0001"\n[keys]\nstore = "software"\n'
    )


def _bootloaders(seeds: dict[str, dict[str, bytes]], tmp: Path) -> None:
    variables = {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "a", "bootcmd": "run x"}
    env = tmp / "uboot.env"
    text = "".join(f"{k}={v}\n" for k, v in variables.items())
    (tmp / "vars.txt").write_text(text)
    copy = tmp / "uboot-redundant.env"
    for path in (env, copy):
        subprocess.run(
            ["mkenvimage", "-s", "0x4000", "-r", "-o", str(path), str(tmp / "vars.txt")],
            check=True,
        )
    (tmp / "fw_env.config").write_text(f"{env} 0x0 0x4000\n{copy} 0x0 0x4000\n")
    out = subprocess.run(
        ["fw_printenv", "-c", str(tmp / "fw_env.config")], capture_output=True, check=True
    ).stdout
    seeds["uboot_env"]["fw_printenv"] = out
    grub = tmp / "grubenv"
    subprocess.run(["grub-editenv", str(grub), "create"], check=True)
    subprocess.run(
        ["grub-editenv", str(grub), "set", "ORDER=A B", "A_OK=1", "A_TRY=0", "B_OK=1", "B_TRY=1"],
        check=True,
    )
    seeds["grub_env"]["list"] = subprocess.run(
        ["grub-editenv", str(grub), "list"], capture_output=True, check=True
    ).stdout


def main(argv: list[str]) -> int:
    wanted = set(argv) or set(TARGETS)
    if wanted - set(TARGETS):
        sys.exit(f"unknown targets {sorted(wanted - set(TARGETS))}")
    seeds: dict[str, dict[str, bytes]] = {name: {} for name in TARGETS}
    DATA.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if wanted & {"est_cacerts", "est_csrattrs", "est_enroll"}:
            _est(seeds, tmp)
        if wanted & {"uboot_env", "grub_env"}:
            _bootloaders(seeds, tmp)
    if wanted & {"firmware_bundle", "firmware_manifest"}:
        _firmware(seeds)
    if wanted & {"mqtt_command", "command_replay_state"}:
        _commands(seeds)
    _states(seeds)
    _config(seeds)
    for target, files in seeds.items():
        if target not in wanted:
            continue
        directory = CORPUS / target
        if directory.exists():
            for old in directory.iterdir():
                if not old.name.startswith("crash-"):
                    old.unlink()
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            check(target, data)  # a seed must itself keep the contract
            (directory / f"seed-{name}").write_bytes(data)
        print(f"{target}: {len(files)} seeds", file=sys.stderr)
    shutil.rmtree(CORPUS / "__pycache__", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
