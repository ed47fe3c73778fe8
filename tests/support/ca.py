"""A small X.509 CA for tests, benchmarks and the demo (cryptography only, all in memory)."""

from __future__ import annotations

import datetime as dt
import functools
import subprocess
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
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import univ


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


def _hash_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def openssl_root(directory: Path, name: str, *, kind: str = "default") -> TestCA:
    """A root made by the `openssl` command line, as operators make them:

    - "default": `openssl req -x509` with default settings (EC P-256);
    - "v1": a version 1 certificate, no extensions (`openssl x509 -req -signkey`), RSA;
    - "sha1": `openssl req -x509 -sha1` with an RSA key (SHA-1 self-signature).
    """
    directory.mkdir(parents=True, exist_ok=True)
    key_file, cert_file = directory / f"{kind}-root.key", directory / f"{kind}-root.pem"
    subject = f"/CN={name}"
    run = functools.partial(subprocess.run, check=True, capture_output=True)
    if kind == "default":
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-subj", subject, "-days", "365", "-keyout", key_file, "-out", cert_file])  # fmt: skip
    elif kind == "sha1":
        run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-sha1", "-nodes", "-subj",
             subject, "-days", "365", "-keyout", key_file, "-out", cert_file])  # fmt: skip
    elif kind == "v1":
        csr = directory / "v1-root.csr"
        run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
             "-keyout", key_file, "-out", csr])  # fmt: skip
        run(["openssl", "x509", "-req", "-in", csr, "-signkey", key_file, "-days", "365",
             "-out", cert_file])  # fmt: skip
    else:
        raise ValueError(kind)
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    shape = CaShape(key_ids=cert.version is x509.Version.v3)
    return TestCA(name=name, key=key, cert=cert, shape=shape)  # type: ignore[arg-type]


@dataclass(frozen=True)
class CaShape:
    """How a CA certificate is made: the variations real private PKIs produce."""

    key_usage: bool = True  # keyUsage keyCertSign + cRLSign (critical)
    bc_critical: bool = True  # basicConstraints marked critical
    key_ids: bool = True  # subjectKeyIdentifier (and authorityKeyIdentifier below a root)
    path_length: int | None = None
    bc_ca: bool = True  # False: basicConstraints cA=FALSE (a certificate that may not issue)
    basic_constraints: bool = True
    name_constraints: x509.NameConstraints | None = None
    eku: tuple[x509.ObjectIdentifier, ...] = ()  # an extendedKeyUsage on the CA itself
    profile: str = ""  # "ejbca" | "adcs": CDP, AIA, policies and the like


@dataclass(frozen=True)
class LeafProfile:
    """What an issued certificate carries besides the subject and key."""

    profile: str = ""  # "ejbca" | "adcs": CDP, AIA, policies and the like
    key_ids: bool = True
    key_usage: bool = True
    eku: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.CLIENT_AUTH,)


def _profile_extensions(profile: str, ca_name: str) -> list[tuple[x509.ExtensionType, bool]]:
    """The extensions an EJBCA- or AD CS-like CA puts in what it signs (CDP, AIA, policies)."""
    if not profile:
        return []
    slug = ca_name.replace(" ", "-")
    cdp = x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(f"http://pki.example/crl/{slug}.crl")],
                relative_name=None, reasons=None, crl_issuer=None,
            )
        ]
    )  # fmt: skip
    aia = x509.AuthorityInformationAccess(
        [
            x509.AccessDescription(
                x509.oid.AuthorityInformationAccessOID.CA_ISSUERS,
                x509.UniformResourceIdentifier(f"http://pki.example/ca/{slug}.crt"),
            ),
            x509.AccessDescription(
                x509.oid.AuthorityInformationAccessOID.OCSP,
                x509.UniformResourceIdentifier("http://ocsp.pki.example"),
            ),
        ]
    )
    if profile == "ejbca":
        policies = x509.CertificatePolicies(
            [x509.PolicyInformation(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1.1"), None)]
        )
        return [(cdp, False), (aia, False), (policies, False)]
    if profile == "adcs":
        # AD CS: certificate template (1.3.6.1.4.1.311.21.7), CA version (311.21.1), an
        # application-policies copy of the EKU (311.21.10), a CDP with an LDAP and an HTTP URL
        template_info = univ.Sequence()
        template_info.setComponentByPosition(
            0, univ.ObjectIdentifier("1.3.6.1.4.1.311.21.8.1.2.7"), verifyConstraints=False
        )
        template_info.setComponentByPosition(1, univ.Integer(100), verifyConstraints=False)
        template_info.setComponentByPosition(2, univ.Integer(3), verifyConstraints=False)
        template = x509.UnrecognizedExtension(
            x509.ObjectIdentifier("1.3.6.1.4.1.311.21.7"), bytes(der_encoder.encode(template_info))
        )
        ca_version = x509.UnrecognizedExtension(
            x509.ObjectIdentifier("1.3.6.1.4.1.311.21.1"), b"\x02\x01\x00"
        )
        app_policies = x509.UnrecognizedExtension(
            x509.ObjectIdentifier("1.3.6.1.4.1.311.21.10"),
            bytes.fromhex("300c300a06082b06010505070302"),
        )
        ldap_cdp = x509.CRLDistributionPoints(
            [
                x509.DistributionPoint(
                    full_name=[
                        x509.UniformResourceIdentifier(
                            f"ldap:///CN={slug},CN=pki,CN=CDP,DC=corp,DC=example?"
                            "certificateRevocationList?base?objectClass=cRLDistributionPoint"
                        ),
                        x509.UniformResourceIdentifier(f"http://pki.example/crl/{slug}.crl"),
                    ],
                    relative_name=None, reasons=None, crl_issuer=None,
                )
            ]
        )  # fmt: skip
        policies = x509.CertificatePolicies(
            [
                x509.PolicyInformation(
                    x509.ObjectIdentifier("1.3.6.1.4.1.311.21.8.1.2"),
                    ["http://pki.example/cps.html"],
                )
            ]
        )
        return [(ldap_cdp, False), (aia, False), (policies, False), (template, False),
                (ca_version, False), (app_policies, False)]  # fmt: skip
    raise ValueError(f"unknown profile {profile!r}")


def _key_usage(*, sign: bool, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


@dataclass
class TestCA:
    """A CA: a self-signed root, or (with `parent`) an intermediate issued by another TestCA.

    `shape` says how its own certificate is made; `cert` may be given instead (one made by
    `openssl`, see `openssl_root`).
    """

    __test__ = False  # not a pytest test class

    name: str = "devid test root"
    key: CertificateIssuerPrivateKeyTypes = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    shape: CaShape = field(default_factory=CaShape)
    parent: TestCA | None = None
    cert: x509.Certificate = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.cert is not None:
            return
        now = utcnow()
        shape = self.shape
        issuer_name = self.parent.cert.subject if self.parent else _name(self.name)
        signer = self.parent.key if self.parent else self.key
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(self.name))
            .issuer_name(issuer_name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
        )
        if shape.basic_constraints:
            builder = builder.add_extension(
                x509.BasicConstraints(ca=shape.bc_ca, path_length=shape.path_length),
                critical=shape.bc_critical,
            )
        if shape.key_usage:
            builder = builder.add_extension(_key_usage(sign=True, ca=True), critical=True)
        if shape.key_ids:
            builder = builder.add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            if self.parent is not None and self.parent.shape.key_ids:
                builder = builder.add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(
                        self.parent.key.public_key()  # type: ignore[arg-type]
                    ),
                    critical=False,
                )
        if shape.name_constraints is not None:
            builder = builder.add_extension(shape.name_constraints, critical=True)
        if shape.eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(shape.eku)), critical=False)
        if self.parent is not None:
            for ext, critical in _profile_extensions(self.parent.shape.profile, self.parent.name):
                builder = builder.add_extension(ext, critical)
        self.cert = builder.sign(signer, _hash_for(signer))

    def chain(self) -> list[x509.Certificate]:
        """This CA's certificate and those above it, root last."""
        return [self.cert, *(self.parent.chain() if self.parent else [])]

    def root(self) -> TestCA:
        return self.parent.root() if self.parent else self

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
        profile: LeafProfile | None = None,
    ) -> x509.Certificate:
        now = utcnow()
        leaf = profile or LeafProfile(eku=())
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
        )
        shape = getattr(self, "shape", CaShape())  # tests/support/firmware.py skips __init__
        if leaf.key_ids and shape.key_ids:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),  # type: ignore[arg-type]
                critical=False,
            ).add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        if leaf.key_usage:
            builder = builder.add_extension(_key_usage(sign=True, ca=ca), critical=True)
        eku = eku if eku is not None else list(leaf.eku)
        if eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        for ext, critical in _profile_extensions(leaf.profile or shape.profile, self.name):
            builder = builder.add_extension(ext, critical)
        return builder.sign(self.key, _hash_for(self.key))

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
