"""Is a signer certificate a firmware signer? X.509 path validation at an explicit time.

cryptography's verifier builds and checks the path (signatures, validity, basicConstraints,
name chaining, CA key usage) against the configured anchors; we ask it to require the
codeSigning EKU on the signer, and to read a CA's EKU, when present, as permission to issue
code-signing certificates (its client-verifier default would demand clientAuth there). It
does no revocation, so each certificate of the built chain is then looked up in the configured
CRLs, after each CRL's own signature and validity period are checked against the issuer the
verifier already validated (a lookup, not a second chain walker). A few plain checks run first
only to give a clearer one-line reason than the verifier's.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.errors import ChainValidationError

MAX_CHAIN_DEPTH = 4


@dataclass(frozen=True)
class NamedCrl:
    source: str  # where it came from, for messages
    crl: x509.CertificateRevocationList


@dataclass(frozen=True)
class TrustPolicy:
    anchors: tuple[x509.Certificate, ...]
    crls: tuple[NamedCrl, ...] = field(default=())
    #: distinct signer keys, each chaining to an anchor, that must sign a bundle (TUF's
    #: threshold); a bundle may carry more, and every one it carries must verify
    required_signers: int = 1


def _who(cert: x509.Certificate) -> str:
    return f"{cert.subject.rfc4514_string() or '(empty subject)'} (serial {cert.serial_number:x})"


def _require_code_signing(
    _policy: verification.Policy, cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None
) -> None:
    # Deliberately codeSigning itself: anyExtendedKeyUsage alone does not make a signer.
    if eku is None or ExtendedKeyUsageOID.CODE_SIGNING not in eku:
        raise ValueError(f"{_who(cert)} lacks the codeSigning extended key usage")


def _require_signing_key(
    _policy: verification.Policy, cert: x509.Certificate, usage: x509.KeyUsage | None
) -> None:
    if usage is not None and (not usage.digital_signature or usage.key_cert_sign):
        raise ValueError(f"{_who(cert)} key usage does not allow signing firmware")


def _ca_permits_code_signing(
    _policy: verification.Policy, cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None
) -> None:
    # RFC 5280 leaves EKU in CA certificates undefined; like every major verifier we read it
    # as a constraint on what the CA may issue. The client verifier's default would demand
    # clientAuth here: it rejects a code-signing-only intermediate and accepts a TLS-client one.
    if eku is not None and not {
        ExtendedKeyUsageOID.CODE_SIGNING,
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    } & set(eku):
        raise ValueError(f"CA {_who(cert)} is restricted to other extended key usages")


def _precheck(certs: Sequence[x509.Certificate], now: datetime) -> None:
    signer = certs[0]
    for cert in certs:
        if now > cert.not_valid_after_utc:
            raise ChainValidationError(
                f"certificate {_who(cert)} expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
            )
        if now < cert.not_valid_before_utc:
            raise ChainValidationError(
                f"certificate {_who(cert)} is not valid before "
                f"{cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}"
            )
    try:
        eku = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is None or ExtendedKeyUsageOID.CODE_SIGNING not in eku:
        raise ChainValidationError(
            f"signer certificate {_who(signer)} lacks the codeSigning extended key usage"
        )


def _check_revocation(
    chain: Sequence[x509.Certificate], crls: Sequence[NamedCrl], now: datetime
) -> None:
    # chain[i] is issued by chain[i + 1]; the last one is the anchor itself.
    for cert, issuer in itertools.pairwise(chain):
        for named in crls:
            crl = named.crl
            if crl.issuer != issuer.subject:
                continue
            if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
                raise ChainValidationError(
                    f"CRL {named.source} does not verify against its issuer {_who(issuer)}"
                )
            if now < crl.last_update_utc:
                raise ChainValidationError(
                    f"CRL {named.source} is not valid before "
                    f"{crl.last_update_utc:%Y-%m-%dT%H:%M:%SZ}"
                )
            if crl.next_update_utc is not None and now > crl.next_update_utc:
                raise ChainValidationError(
                    f"CRL {named.source} is stale: its next update was due "
                    f"{crl.next_update_utc:%Y-%m-%dT%H:%M:%SZ}"
                )
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                raise ChainValidationError(
                    f"certificate {_who(cert)} is revoked (CRL {named.source})"
                )


def verify_signer(
    certs: Sequence[x509.Certificate], policy: TrustPolicy, now: datetime
) -> list[x509.Certificate]:
    """Validate `certs` (signer first, then intermediates) at `now`; return the built chain
    (signer ... anchor) or raise ChainValidationError with the reason."""
    if not policy.anchors:
        raise ChainValidationError("no firmware trust anchors are configured")
    try:
        return _verify(certs, policy, now)
    except ChainValidationError:
        raise
    except Exception as e:  # fields of these untrusted certificates are parsed lazily
        raise ChainValidationError(f"malformed certificate in the signer chain: {e}") from e


def _verify(
    certs: Sequence[x509.Certificate], policy: TrustPolicy, now: datetime
) -> list[x509.Certificate]:
    _precheck(certs, now)
    # The Web PKI's end-entity rules (not a CA, no unknown critical extensions), with changes
    # for code signing: a signer names no host or address, so it needs no subjectAltName; a
    # KeyUsage, if present, must allow signatures (the Web PKI only forbids keyCertSign); and
    # it needs codeSigning, not clientAuth.
    ee_policy = (
        verification.ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None)
        .may_be_present(x509.KeyUsage, verification.Criticality.AGNOSTIC, _require_signing_key)
        .require_present(
            x509.ExtendedKeyUsage, verification.Criticality.AGNOSTIC, _require_code_signing
        )
    )
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(list(policy.anchors)))
        .time(now)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca().may_be_present(
                x509.ExtendedKeyUsage, verification.Criticality.AGNOSTIC, _ca_permits_code_signing
            ),
            ee_policy=ee_policy,
        )
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(certs[0], list(certs[1:]))
    except verification.VerificationError as e:
        raise ChainValidationError(
            f"signer certificate {_who(certs[0])} does not chain to a firmware trust anchor: {e}"
        ) from e
    chain = list(verified.chain)
    _check_revocation(chain, policy.crls, now)
    return chain
