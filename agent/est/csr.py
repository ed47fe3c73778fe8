"""CSRs for EST: from a plan, from the certificate being renewed, or rebound to a new tls-unique."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from agent.errors import KeyStoreError
from agent.pki import SubjectSpec, build_csr

log = logging.getLogger(__name__)

_HASHES: dict[str, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


@dataclass(frozen=True)
class CertificateSubject(SubjectSpec):
    """A subject copied verbatim from a certificate (RFC 7030 4.2.2: a re-enrollment CSR's
    subject and subjectAltName must be those of the certificate being renewed)."""

    fixed: x509.Name | None = None

    def name(self) -> x509.Name:
        return self.fixed if self.fixed is not None else super().name()


def subject_of(cert: x509.Certificate) -> CertificateSubject:
    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        dns = tuple(san.get_values_for_type(x509.DNSName))
        if len(uris) + len(dns) < len(san):
            log.warning("renewal CSR carries only the URI and DNS names of the current SAN")
    return CertificateSubject(fixed=cert.subject, san_uris=uris, san_dns=dns)


def make_csr(
    key: CertificateIssuerPrivateKeyTypes,
    subject: SubjectSpec,
    *,
    challenge_password: str | None,
    hash_name: str | None,
) -> bytes:
    algorithm = _HASHES[hash_name]() if hash_name in _HASHES else None
    csr = build_csr(key, subject, challenge_password=challenge_password, hash_algorithm=algorithm)
    return csr.public_bytes(serialization.Encoding.DER)


def rebind(csr_der: bytes, key: CertificateIssuerPrivateKeyTypes, challenge_password: str) -> bytes:
    """The same request (subject, extensions, hash, key) with a new challengePassword: a pending
    request resubmitted over a new connection must prove possession for *that* connection."""
    try:
        old = x509.load_der_x509_csr(csr_der)
    except ValueError as e:
        raise KeyStoreError(f"the pending CSR cannot be parsed: {e}") from e
    builder = x509.CertificateSigningRequestBuilder().subject_name(old.subject)
    for extension in old.extensions:
        builder = builder.add_extension(extension.value, critical=extension.critical)
    builder = builder.add_attribute(
        x509.oid.AttributeOID.CHALLENGE_PASSWORD, challenge_password.encode("ascii")
    )
    algorithm = old.signature_hash_algorithm
    if not isinstance(algorithm, (hashes.SHA256, hashes.SHA384, hashes.SHA512)):
        raise KeyStoreError("the pending CSR uses an unsupported signature hash")
    try:
        csr = builder.sign(key, algorithm)
    except Exception as e:
        raise KeyStoreError(f"could not sign the CSR: {e}") from e
    return csr.public_bytes(serialization.Encoding.DER)
