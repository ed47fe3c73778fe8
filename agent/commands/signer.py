"""Who may sign a command, and with what (pure).

The signature schemes (`alg`, JOSE names; the key type must fit):

    ES256  ECDSA P-256, SHA-256, DER signature (X9.62 Ecdsa-Sig-Value, what OpenSSL writes)
    ES384  ECDSA P-384, SHA-384, DER signature
    PS256  RSA >= 2048 bits, PSS, SHA-256, MGF1-SHA-256, salt length 32
    RS256  RSA >= 2048 bits, PKCS #1 v1.5, SHA-256

Nothing else (no Ed25519, P-521, SHA-1, short RSA): the accepted set is what an operator's HSM
or KMS signs with and no more.

The signer's certificate (the command-signing profile, docs/commands.md): an RFC 5280 path from
it to one of the command trust anchors, walked by `agent.pkix.validate_path` (the private-PKI
validator the EST code uses: the anchor is an input, so an operator's own root works, v1 or
without basicConstraints; intermediates are real CAs, pathLen and nameConstraints honoured, an
extendedKeyUsage on a CA read as a limit on what it may issue), with `COMMAND_SIGNING` as the
purpose; and on the signer itself: the command-signing EKU named explicitly (neither
anyExtendedKeyUsage nor codeSigning nor clientAuth makes a command signer), a keyUsage with
digitalSignature and without keyCertSign, not a CA, valid now and at the command's issued_at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from agent.commands.errors import CommandRefused
from agent.errors import ConfigError
from agent.pkix import PathError, check_critical, extension, validate_path

#: the devid-agent command-signing extended key usage: 2.25.<a UUID as an integer> (ITU-T X.667,
#: no registration needed), UUID 1f5a552e-ef8f-48b0-bddd-6e78c90582fa. Fixed forever.
COMMAND_SIGNING = x509.ObjectIdentifier("2.25.41675102310052449604932628050312790778")

ALGORITHMS = ("ES256", "ES384", "PS256", "RS256")
MIN_RSA_BITS = 2048
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


@dataclass(frozen=True)
class Signer:
    """The validated signer: its certificate and the path to the anchor (signer first)."""

    certificate: x509.Certificate
    path: tuple[x509.Certificate, ...]

    @property
    def subject(self) -> str:
        return _name(self.certificate.subject)

    @property
    def serial(self) -> str:
        return f"{self.certificate.serial_number:x}"


def _name(name: x509.Name) -> str:
    try:
        return name.rfc4514_string() or "(empty subject)"
    except ValueError:
        return "(malformed name)"


def _who(cert: x509.Certificate) -> str:
    return f"signer {_name(cert.subject)!r} (serial {cert.serial_number:x})"


def _untrusted(message: str) -> CommandRefused:
    return CommandRefused("untrusted_signer", message)


def algorithm_for(key: object) -> tuple[str, ...]:
    """The `alg` values a signer with public key `key` may use; () if its key type is refused."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": ("ES256",), "secp384r1": ("ES384",)}.get(key.curve.name, ())
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA_BITS:
        return ("PS256", "RS256")
    return ()


def check_signature(cert: x509.Certificate, alg: str, signature: bytes, payload: bytes) -> None:
    """`signature` by `cert`'s key over exactly `payload` in scheme `alg`, or CommandRefused."""
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise _untrusted(f"{_who(cert)} has a public key that cannot be used: {e}") from e
    allowed = algorithm_for(key)
    if not allowed:
        raise _untrusted(
            f"{_who(cert)} has a key type commands may not be signed with "
            "(ECDSA P-256/P-384 or RSA >= 2048 bits)"
        )
    if alg not in allowed:
        raise CommandRefused(
            "bad_signature", f"alg {alg} does not fit the signer's key (want {'/'.join(allowed)})"
        )
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            digest = hashes.SHA384() if alg == "ES384" else hashes.SHA256()
            key.verify(signature, payload, ec.ECDSA(digest))
        elif isinstance(key, rsa.RSAPublicKey):
            pad = _PSS if alg == "PS256" else padding.PKCS1v15()
            key.verify(signature, payload, pad, hashes.SHA256())
    except InvalidSignature as e:
        raise CommandRefused(
            "bad_signature", f"the {alg} signature does not verify over the payload"
        ) from e


def validate_signer(
    certs: Sequence[x509.Certificate],
    *,
    anchors: Sequence[x509.Certificate],
    now: datetime,
    skew: timedelta,
) -> Signer:
    """`certs[0]` is a command signer under `anchors` at `now` (± `skew`), with `certs[1:]` as
    the intermediates it may need; or CommandRefused("untrusted_signer")."""
    if not anchors:
        raise _untrusted("no command trust anchors are configured")
    leaf = certs[0]
    who = _who(leaf)
    check_critical(leaf, who=who, fail=_untrusted)
    constraints = extension(leaf, x509.BasicConstraints, who=who, fail=_untrusted)
    if constraints is not None and constraints.ca:
        raise _untrusted(f"{who} is a CA certificate (basicConstraints cA): a CA signs no commands")
    usage = extension(leaf, x509.KeyUsage, who=who, fail=_untrusted)
    if usage is None or not usage.digital_signature or usage.key_cert_sign:
        raise _untrusted(f"{who} needs a keyUsage with digitalSignature (and not keyCertSign)")
    eku = extension(leaf, x509.ExtendedKeyUsage, who=who, fail=_untrusted)
    if eku is None or COMMAND_SIGNING not in eku:
        raise _untrusted(
            f"{who} lacks the command-signing extended key usage {COMMAND_SIGNING.dotted_string}"
        )
    try:
        path = validate_path(
            leaf,
            anchors=anchors,
            intermediates=certs[1:],
            now=now,
            skew=skew,
            purpose=COMMAND_SIGNING,
        )
    except PathError as e:
        raise _untrusted(f"{who} does not chain to a command trust anchor: {e}") from e
    return Signer(certificate=leaf, path=path.certificates)


def check_valid_at(signer: Signer, issued_at: datetime, skew: timedelta) -> None:
    """The signer's certificate was valid when it says it signed (`issued_at`)."""
    cert = signer.certificate
    if not cert.not_valid_before_utc - skew <= issued_at <= cert.not_valid_after_utc + skew:
        raise _untrusted(
            f"{_who(cert)} was not valid at the command's issued_at "
            f"{issued_at:%Y-%m-%dT%H:%M:%SZ} (valid {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}"
            f" to {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})"
        )


def parse_anchors(data: bytes, where: str) -> tuple[x509.Certificate, ...]:
    """The command trust anchors in PEM `data` (at least one), or ConfigError naming `where`."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ConfigError(f"{where}: no valid PEM certificates: {e}") from e
    return tuple(certs)
