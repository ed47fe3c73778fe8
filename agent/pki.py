"""CSRs and certificate helpers: pure functions over keys, bytes and `now`."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import NameOID

from agent.config import SubjectConfig
from agent.errors import ConfigError, KeyStoreError


@dataclass(frozen=True)
class SubjectSpec:
    """What goes into a CSR's subject and subjectAltName."""

    common_name: str | None = None
    serial_number: str | None = None
    organization: str | None = None
    organizational_unit: str | None = None
    san_uris: tuple[str, ...] = ()
    san_dns: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, device_id: str, subject: SubjectConfig) -> SubjectSpec:
        def expand(items: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(item.replace("{device_id}", device_id) for item in items)

        return cls(
            common_name=device_id if subject.common_name else None,
            serial_number=device_id if subject.serial_number else None,
            organization=subject.organization or None,
            organizational_unit=subject.organizational_unit or None,
            san_uris=expand(subject.san_uris),
            san_dns=expand(subject.san_dns),
        )

    def name(self) -> x509.Name:
        attributes = []
        for oid, value in (
            (NameOID.ORGANIZATION_NAME, self.organization),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, self.organizational_unit),
            (NameOID.SERIAL_NUMBER, self.serial_number),
            (NameOID.COMMON_NAME, self.common_name),
        ):
            if value:
                attributes.append(x509.NameAttribute(oid, value))
        return x509.Name(attributes)


def default_hash(public_key: PublicKeyTypes) -> hashes.SHA256 | hashes.SHA384:
    """The signature hash that matches the key's strength (SHA-384 for P-384, else SHA-256)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def build_csr(
    key: CertificateIssuerPrivateKeyTypes,
    subject: SubjectSpec,
    *,
    challenge_password: str | None = None,
    hash_algorithm: hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None = None,
) -> x509.CertificateSigningRequest:
    """A CSR for `subject`, signed by `key` (inside the TPM for a TPM key), verified before use.

    `challenge_password` carries the TLS `tls-unique` value for EST proof-of-possession.
    """
    try:
        builder = x509.CertificateSigningRequestBuilder().subject_name(subject.name())
        general_names: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(uri) for uri in subject.san_uris
        ]
        general_names += [x509.DNSName(dns) for dns in subject.san_dns]
    except ValueError as e:  # e.g. a commonName over 64 characters, a non-ASCII DNS name
        raise ConfigError(f"cannot put this subject into a CSR ([subject], device.id): {e}") from e
    if general_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(general_names), critical=False)
    builder = builder.add_extension(
        x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )
    builder = builder.add_extension(
        x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
    )
    if challenge_password is not None:
        builder = builder.add_attribute(
            x509.oid.AttributeOID.CHALLENGE_PASSWORD, challenge_password.encode("ascii")
        )
    algorithm = hash_algorithm or default_hash(key.public_key())
    try:
        csr = builder.sign(key, algorithm)
    except Exception as e:  # the TPM (or a broken key) refused to sign
        raise KeyStoreError(f"could not sign the CSR: {e}") from e
    if not csr.is_signature_valid:
        raise KeyStoreError("the key store produced a CSR whose signature does not verify")
    if public_key_der(csr.public_key()) != public_key_der(key.public_key()):
        raise KeyStoreError("the CSR carries a different public key than the signing key")
    return csr


def public_key_der(key: PublicKeyTypes) -> bytes:
    """SubjectPublicKeyInfo DER: the canonical form for comparing public keys."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def describe_key(key: PublicKeyTypes) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__


KEY_CHECK_DATA = b"devid-agent: does this key sign for its certificate?"


def signs_for(key: CertificateIssuerPrivateKeyTypes, public: PublicKeyTypes) -> bool:
    """Whether `key` (in the TPM or a file) makes a signature that `public` verifies: the
    identity's key loads, signs, and is the certificate's."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import padding

    try:
        if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(
            public, ec.EllipticCurvePublicKey
        ):
            algorithm = ec.ECDSA(default_hash(public))
            public.verify(key.sign(KEY_CHECK_DATA, algorithm), KEY_CHECK_DATA, algorithm)
            return True
        if isinstance(key, rsa.RSAPrivateKey) and isinstance(public, rsa.RSAPublicKey):
            digest = hashes.SHA256()
            signature = key.sign(KEY_CHECK_DATA, padding.PKCS1v15(), digest)
            public.verify(signature, KEY_CHECK_DATA, padding.PKCS1v15(), digest)
            return True
    except InvalidSignature:
        return False
    return False
