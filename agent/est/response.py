"""Certs-only PKCS#7 and the checks an issued certificate must pass before it is stored (pure).

Everything here takes bytes, certificates and `now`; nothing touches the disk or the network, so
a refusal leaves the identity store as it was.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.errors import ChainValidationError, EnrollmentError, TrustError
from agent.pki import public_key_der
from agent.pkix import PathError, check_critical, extension, validate_path
from agent.validity import State, validity

_E = TypeVar("_E", bound=x509.ExtensionType)


def parse_certs_only(der: bytes, what: str) -> list[x509.Certificate]:
    """The certificates of a DER PKCS#7 certs-only (degenerate SignedData) message."""
    try:
        certs = pkcs7.load_der_pkcs7_certificates(der)
    # ValueError, UnsupportedAlgorithm (another PKCS#7 content type), x509.InvalidVersion...:
    # any failure to parse these untrusted bytes is a refusal of the response
    except Exception as e:
        raise EnrollmentError(f"{what}: not a PKCS#7 certs-only message: {e}") from e
    if not certs:
        raise EnrollmentError(f"{what}: the PKCS#7 message holds no certificates")
    for i, cert in enumerate(certs):
        # cryptography parses names and times lazily: read them now, so a malformed one is
        # refused here with one line, not as a ValueError from whichever check reads it first
        # (extensions are judged, with their own messages, by the checks that read them)
        try:
            _ = (cert.subject, cert.issuer, cert.not_valid_before_utc, cert.not_valid_after_utc)
        except Exception as e:
            raise EnrollmentError(f"{what}: certificate {i} is malformed: {e}") from e
    return certs


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lower-case hex."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def normalize_fingerprint(text: str) -> str:
    return text.replace(":", "").strip().lower()


def select_bootstrap_anchor(certs: Sequence[x509.Certificate], expected: str) -> x509.Certificate:
    """RFC 7030 4.1.1: the /cacerts certificate whose SHA-256 fingerprint was configured."""
    want = normalize_fingerprint(expected)
    for cert in certs:
        if fingerprint(cert) == want:
            constraints = _extension(cert, x509.BasicConstraints, "the bootstrap CA certificate")
            # RFC 5280: a v3 CA says so in basicConstraints; a self-signed v1 certificate can
            # only be a root (the anchor is an input, agent.pkix)
            v1_root = cert.version is x509.Version.v1 and cert.subject == cert.issuer
            if (constraints is None and not v1_root) or (constraints and not constraints.ca):
                raise ChainValidationError(
                    "bootstrap: the certificate with the configured SHA-256 fingerprint "
                    f"({_subject(cert)!r}) is not a CA certificate; configure the EST CA's"
                )
            return cert
    seen = ", ".join(fingerprint(c)[:16] + "..." for c in certs)
    raise ChainValidationError(
        f"bootstrap: no certificate from /cacerts has the configured SHA-256 fingerprint "
        f"{want[:16]}... (got {seen}); refusing to trust the EST server"
    )


def ca_roots(certs: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """The self-signed certificates among the EST CA certificates: the trust anchors."""
    return [c for c in certs if c.subject == c.issuer] or list(certs)


@dataclass(frozen=True)
class IssuedCertificate:
    certificate: x509.Certificate
    #: the issuing chain above the certificate, nearest first (root last)
    chain: tuple[x509.Certificate, ...]


def validate_issued(
    certs: Sequence[x509.Certificate],
    *,
    requested_key: PublicKeyTypes,
    ca_certs: Sequence[x509.Certificate],
    now: datetime,
    clock_skew: timedelta,
) -> IssuedCertificate:
    """Pick the certificate for `requested_key` out of an enrollment response and check it.

    It must carry the CSR's public key, chain to the EST CA certificates (RFC 5280 path
    validation, agent.pkix, the self-signed ones as anchors), be valid now give or take
    `clock_skew`, allow digitalSignature, not be a CA, carry no critical extension we do not
    understand, and (if it has an extendedKeyUsage) allow clientAuth.
    """
    wanted = public_key_der(requested_key)
    mine = [c for c in certs if _spki(c) == wanted]
    if not mine:
        # a security event, not a bad response to retry soon: a CA that binds another key to
        # our request (someone else's certificate, or a swapped answer) is reported, and the
        # service backs off to the maximum (docs/daemon.md)
        raise TrustError(
            "the issued certificate is for another key than the one in our CSR "
            f"(subject {_subject(certs[0])!r})"
        )
    leaf = mine[0]
    others = [c for c in certs if c is not leaf]
    _check_validity(leaf, now, clock_skew)
    _check_usage(leaf)
    _check_critical(leaf)
    roots = ca_roots(ca_certs)
    intermediates = [c for c in [*others, *ca_certs] if c not in roots]
    try:
        path = validate_path(
            leaf,
            anchors=roots,
            intermediates=intermediates,
            now=now,
            skew=clock_skew,
            purpose=ExtendedKeyUsageOID.CLIENT_AUTH,
        )
    except PathError as e:
        raise ChainValidationError(
            f"the issued certificate {_subject(leaf)!r} (issuer {_issuer(leaf)!r}) does not "
            f"chain to the EST CA certificates: {e}"
        ) from e
    return IssuedCertificate(certificate=leaf, chain=path.above)


def _check_validity(cert: x509.Certificate, now: datetime, skew: timedelta) -> None:
    state = validity(cert, now, skew).state
    if state is State.NOT_YET_VALID:
        raise ChainValidationError(
            f"the issued certificate is not valid before {cert.not_valid_before_utc.isoformat()} "
            f"(now {now.isoformat()}, clock skew allowed {skew.total_seconds():.0f} s)"
        )
    if state is State.EXPIRED:
        raise ChainValidationError(
            f"the issued certificate expired at {cert.not_valid_after_utc.isoformat()}"
        )


def _check_usage(cert: x509.Certificate) -> None:
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise EnrollmentError("the issued certificate is a CA certificate (basicConstraints CA)")
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and not usage.digital_signature:
        raise EnrollmentError("the issued certificate's keyUsage does not allow digitalSignature")
    eku = _extension(cert, x509.ExtendedKeyUsage)
    allowed = {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
    if eku is not None and not allowed.intersection(eku):
        raise EnrollmentError("the issued certificate's extendedKeyUsage does not allow clientAuth")


def _check_critical(cert: x509.Certificate) -> None:
    check_critical(cert, who="the issued certificate", fail=EnrollmentError)


def _extension(
    cert: x509.Certificate, kind: type[_E], what: str = "the issued certificate"
) -> _E | None:
    return extension(cert, kind, who=what, fail=EnrollmentError)


def _spki(cert: x509.Certificate) -> bytes | None:
    try:
        return public_key_der(cert.public_key())
    except (ValueError, UnsupportedAlgorithm):
        return None  # not ours, whatever it is


def _subject(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string()
    except ValueError:
        return "(malformed subject)"


def _issuer(cert: x509.Certificate) -> str:
    try:
        return cert.issuer.rfc4514_string()
    except ValueError:
        return "(malformed issuer)"


def validate_ca_certs(
    certs: Sequence[x509.Certificate], *, now: datetime, clock_skew: timedelta
) -> list[x509.Certificate]:
    """The /cacerts certificates that are CA certificates and valid now (others dropped)."""
    valid = [c for c in certs if validity(c, now, clock_skew).valid]
    if not valid:
        raise EnrollmentError("/cacerts: none of the CA certificates is valid now")
    return valid
