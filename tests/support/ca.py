"""A small X.509 CA for tests, benchmarks and the demo (cryptography only, all in memory)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class TestCA:
    """A self-signed root (optionally with an intermediate doing the issuing)."""

    __test__ = False  # not a pytest test class

    name: str = "devid test root"
    key: CertificateIssuerPrivateKeyTypes = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    cert: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        now = utcnow()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(self.name))
            .issuer_name(_name(self.name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip

    def issue(
        self,
        public_key: CertificatePublicKeyTypes,
        *,
        subject: x509.Name | str,
        eku: list[x509.ObjectIdentifier] | None = None,
        sans: list[x509.GeneralName] | None = None,
        ca: bool = False,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        lifetime: dt.timedelta = dt.timedelta(days=30),
        serial: int | None = None,
    ) -> x509.Certificate:
        now = utcnow()
        start = not_before or now - dt.timedelta(minutes=5)
        name = _name(subject) if isinstance(subject, str) else subject
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(serial or x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(not_after or start + lifetime)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        if eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def server_identity(self, directory: Path, host: str = "localhost") -> tuple[Path, Path]:
        """Write a TLS server cert (SAN localhost + 127.0.0.1) and key; return their paths."""
        import ipaddress

        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.issue(
            key.public_key(),
            subject=host,
            eku=[ExtendedKeyUsageOID.SERVER_AUTH],
            sans=[x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
            lifetime=dt.timedelta(days=365),
        )
        cert_path, key_path = directory / f"{host}.crt", directory / f"{host}.key"
        cert_path.write_bytes(pem(cert))
        key_path.write_bytes(key_pem(key))
        return cert_path, key_path

    def write_cert(self, path: Path) -> Path:
        path.write_bytes(pem(self.cert))
        return path
