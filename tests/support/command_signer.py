"""The operator's side of signed commands, for tests: a command PKI (root -> intermediate ->
command signer, made with tests/support/ca.py) and envelopes signed by it (docs/commands.md).

    pki = CommandPki()
    raw = pki.signer.envelope(payload(device="gw-1", command="ping", issued_at=now))
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from agent.commands.signer import COMMAND_SIGNING
from tests.support.ca import LeafProfile, TestCA, utcnow
from tests.support.firmware import new_key

TIME = "%Y-%m-%dT%H:%M:%SZ"


def payload(
    *,
    device: str,
    command: str = "ping",
    issued_at: dt.datetime,
    lifetime: dt.timedelta = dt.timedelta(minutes=5),
    command_id: str | None = None,
    args: dict[str, Any] | None = None,
    **extra: Any,
) -> bytes:
    """Payload bytes as a backend would write them (`extra` adds or overrides fields)."""
    table: dict[str, Any] = {
        "v": 1,
        "id": command_id or str(uuid.uuid4()),
        "device": device,
        "command": command,
        "args": {} if args is None else args,
        "issued_at": issued_at.strftime(TIME),
        "expires_at": (issued_at + lifetime).strftime(TIME),
    }
    table.update(extra)
    return json.dumps(table, separators=(",", ":")).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def default_alg(key: CertificateIssuerPrivateKeyTypes) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ES384" if key.curve.key_size == 384 else "ES256"
    return "PS256"


def sign_bytes(key: CertificateIssuerPrivateKeyTypes, alg: str, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA384() if alg == "ES384" else hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        pad: padding.AsymmetricPadding = (
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            if alg == "PS256"
            else padding.PKCS1v15()
        )
        return key.sign(data, pad, hashes.SHA256())
    return key.sign(data)  # type: ignore[call-arg]  # Ed25519: refused by the agent


@dataclass
class CommandSigner:
    key: CertificateIssuerPrivateKeyTypes
    #: signer first, then the intermediates (not the anchor)
    certs: tuple[x509.Certificate, ...]

    def envelope(
        self,
        data: bytes,
        *,
        alg: str | None = None,
        signature: bytes | None = None,
        **override: Any,
    ) -> bytes:
        """The envelope over payload bytes `data` (`override` replaces envelope fields)."""
        alg = alg or default_alg(self.key)
        table: dict[str, Any] = {
            "v": 1,
            "alg": alg,
            "payload": b64(data),
            "sig": b64(signature if signature is not None else sign_bytes(self.key, alg, data)),
            "chain": [b64(c.public_bytes(serialization.Encoding.DER)) for c in self.certs],
        }
        table.update(override)
        return json.dumps(table, separators=(",", ":")).encode()

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def unsigned_envelope(data: bytes) -> bytes:
    return json.dumps({"v": 1, "payload": b64(data)}, separators=(",", ":")).encode()


@dataclass
class CommandPki:
    """root (the device's command trust anchor) -> intermediate -> command signer."""

    root: TestCA = field(default_factory=lambda: TestCA(name="command root"))
    inter: TestCA = field(init=False)
    signer: CommandSigner = field(init=False)
    #: the signer's notBefore (fuzz seeds are judged at a fixed time earlier today)
    not_before: dt.datetime | None = None

    def __post_init__(self) -> None:
        self.inter = TestCA(name="command intermediate", parent=self.root)
        self.signer = self.make_signer()

    def make_signer(
        self,
        kind: str = "ec-p256",
        *,
        eku: list[x509.ObjectIdentifier] | None = None,
        key_usage: bool = True,
        issuer: TestCA | None = None,
        not_before: dt.datetime | None = None,
        lifetime: dt.timedelta = dt.timedelta(days=30),
        ca: bool = False,
    ) -> CommandSigner:
        key = new_key(kind)
        by = issuer or self.inter
        start = not_before or self.not_before or utcnow() - dt.timedelta(days=1)
        cert = by.issue(
            key.public_key(),
            subject=f"command signer {kind}",
            eku=[COMMAND_SIGNING] if eku is None else eku,
            not_before=start,
            lifetime=lifetime,
            profile=LeafProfile(key_usage=key_usage, eku=()),
            ca=ca,
        )
        return CommandSigner(key=key, certs=(cert, *by.chain()[:-1]))
