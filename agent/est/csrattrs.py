"""/csrattrs (RFC 7030 4.5, RFC 8951 4.3): what the server wants in the CSR (pure).

Parsed with pyasn1-modules' `CsrAttrs`. Honoured where the agent can: the key type and curve or
size, the signature hash, subject attributes (serialNumber, commonName). Everything else is
reported back as ignored, so the caller can log it once.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from pyasn1.codec.der import decoder as der_decoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import univ
from pyasn1_modules import rfc7030

from agent.errors import EnrollmentError
from agent.pki import SubjectSpec
from hal.interfaces import KeyAlgorithm

log = logging.getLogger(__name__)

EC_PUBLIC_KEY = "1.2.840.10045.2.1"
RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
CHALLENGE_PASSWORD = "1.2.840.113549.1.9.7"  # noqa: S105 - an OID
SERIAL_NUMBER = "2.5.4.5"
COMMON_NAME = "2.5.4.3"

_CURVES = {
    "1.2.840.10045.3.1.7": KeyAlgorithm.EC_P256,  # prime256v1 / secp256r1
    "1.3.132.0.34": KeyAlgorithm.EC_P384,  # secp384r1
}
_RSA_SIZES = {2048: KeyAlgorithm.RSA_2048, 3072: KeyAlgorithm.RSA_3072}
#: signature algorithms and bare hashes -> hash name
_HASHES = {
    "1.2.840.10045.4.3.2": "sha256",  # ecdsa-with-SHA256
    "1.2.840.10045.4.3.3": "sha384",
    "1.2.840.10045.4.3.4": "sha512",
    "1.2.840.113549.1.1.11": "sha256",  # sha256WithRSAEncryption
    "1.2.840.113549.1.1.12": "sha384",
    "1.2.840.113549.1.1.13": "sha512",
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
}
_NAMES = {
    EC_PUBLIC_KEY: "id-ecPublicKey",
    RSA_ENCRYPTION: "rsaEncryption",
    CHALLENGE_PASSWORD: "challengePassword",
    SERIAL_NUMBER: "serialNumber",
    COMMON_NAME: "commonName",
    "1.2.840.113549.1.9.14": "extensionRequest",
    "1.3.6.1.1.1.1.22": "macAddress",
}


def oid_name(oid: str) -> str:
    return f"{_NAMES[oid]} ({oid})" if oid in _NAMES else oid


@dataclass(frozen=True)
class CsrAttrsHints:
    """What the server asked for, reduced to what the agent understands."""

    key_type: str | None = None  # "ec" or "rsa"
    key_algorithm: KeyAlgorithm | None = None  # when the curve or size is named and supported
    hash_name: str | None = None  # "sha256" | "sha384" | "sha512"
    subject_oids: frozenset[str] = frozenset()
    pop_requested: bool = False
    ignored: tuple[str, ...] = ()


def parse_csrattrs(der: bytes) -> CsrAttrsHints:
    """Parse a DER CsrAttrs. Trailing bytes after the SEQUENCE (seen from real servers) are
    ignored with a log line; anything that is not a CsrAttrs is an EnrollmentError."""
    if not der:
        return CsrAttrsHints()
    try:
        attrs, rest = der_decoder.decode(der, asn1Spec=rfc7030.CsrAttrs())
    except PyAsn1Error as e:
        raise EnrollmentError(f"/csrattrs: not a DER CsrAttrs: {e}") from e
    if rest:
        log.info("/csrattrs: ignoring %d trailing bytes after the CsrAttrs", len(rest))
    key_type: str | None = None
    key_algorithm: KeyAlgorithm | None = None
    hash_name: str | None = None
    subject: set[str] = set()
    pop = False
    ignored: list[str] = []
    for item in attrs:
        kind = item.getName()
        if kind == "oid":
            oid = str(item["oid"])
            if oid in _HASHES:
                hash_name = _HASHES[oid]
            elif oid == EC_PUBLIC_KEY:
                key_type = "ec"
            elif oid == RSA_ENCRYPTION:
                key_type = "rsa"
            elif oid == CHALLENGE_PASSWORD:
                pop = True
            elif oid in (SERIAL_NUMBER, COMMON_NAME):
                subject.add(oid)
            else:
                ignored.append(oid_name(oid))
            continue
        attribute = item["attribute"]
        oid = str(attribute["attrType"])
        values = [bytes(v) for v in attribute["attrValues"]]
        if oid == EC_PUBLIC_KEY:
            key_type = "ec"
            for value in values:
                curve = _decode(value, univ.ObjectIdentifier())
                if curve is not None and str(curve) in _CURVES:
                    key_algorithm = _CURVES[str(curve)]
                else:
                    ignored.append(f"id-ecPublicKey curve {curve} (not supported)")
        elif oid == RSA_ENCRYPTION:
            key_type = "rsa"
            for value in values:
                size = _decode(value, univ.Integer())
                if size is not None and int(size) in _RSA_SIZES:
                    key_algorithm = _RSA_SIZES[int(size)]
                else:
                    ignored.append(f"rsaEncryption size {size} (not supported)")
        else:
            ignored.append(f"attribute {oid_name(oid)}")
    return CsrAttrsHints(
        key_type=key_type,
        key_algorithm=key_algorithm,
        hash_name=hash_name,
        subject_oids=frozenset(subject),
        pop_requested=pop,
        ignored=tuple(ignored),
    )


def _decode(value: bytes, spec: univ.Asn1Item) -> univ.Asn1Item | None:
    try:
        decoded, _rest = der_decoder.decode(value, asn1Spec=spec)
    except PyAsn1Error:
        return None
    return decoded


@dataclass(frozen=True)
class CsrPlan:
    """The key and CSR the agent will make, after honouring /csrattrs."""

    algorithm: KeyAlgorithm
    subject: SubjectSpec
    hash_name: str | None = None
    ignored: tuple[str, ...] = ()


def plan_csr(hints: CsrAttrsHints, algorithm: KeyAlgorithm, subject: SubjectSpec) -> CsrPlan:
    """Apply the hints to the configured algorithm and subject."""
    ignored = list(hints.ignored)
    chosen = algorithm
    if hints.key_algorithm is not None:
        chosen = hints.key_algorithm
    elif hints.key_type == "ec" and algorithm.is_rsa:
        chosen = KeyAlgorithm.EC_P256
    elif hints.key_type == "rsa" and not algorithm.is_rsa:
        chosen = KeyAlgorithm.RSA_2048
    device_id = subject.common_name or subject.serial_number
    if SERIAL_NUMBER in hints.subject_oids and not subject.serial_number:
        if device_id:
            subject = dataclasses.replace(subject, serial_number=device_id)
        else:
            ignored.append("serialNumber (no device id to put there)")
    if COMMON_NAME in hints.subject_oids and not subject.common_name:
        if device_id:
            subject = dataclasses.replace(subject, common_name=device_id)
        else:
            ignored.append("commonName (no device id to put there)")
    return CsrPlan(
        algorithm=chosen, subject=subject, hash_name=hints.hash_name, ignored=tuple(ignored)
    )
