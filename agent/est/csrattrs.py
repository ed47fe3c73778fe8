"""/csrattrs (RFC 7030 4.5, RFC 8951 4.3): what the server wants in the CSR (pure).

Read item by item (RFC 7030's `AttrOrOID`, with pyasn1), bounded in items, bytes and reported
text, so a hostile reply costs little and logs one short line. Honoured where the agent can: the key
type and curve or size, the signature hash, subject attributes (serialNumber, commonName).
Everything else is reported back as ignored, so the caller can log it once.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from pyasn1.codec.der import decoder as der_decoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import namedtype, univ

from agent.errors import EnrollmentError
from agent.pki import SubjectSpec
from hal.interfaces import KeyAlgorithm

log = logging.getLogger(__name__)

EC_PUBLIC_KEY = "1.2.840.10045.2.1"
RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
CHALLENGE_PASSWORD = "1.2.840.113549.1.9.7"  # noqa: S105 - an OID
SERIAL_NUMBER = "2.5.4.5"
COMMON_NAME = "2.5.4.3"
EXTENSION_REQUEST = "1.2.840.113549.1.9.14"

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
    EXTENSION_REQUEST: "extensionRequest",
    "2.5.29.17": "subjectAltName",
    "1.3.132.0.34": "secp384r1",
    "1.2.840.10045.3.1.7": "prime256v1",
    "1.3.6.1.1.1.1.22": "macAddress",
}


class _Attribute(univ.Sequence):  # type: ignore[misc]
    """RFC 2986 Attribute, as RFC 7030 4.5.2 uses it (pyasn1-modules' rfc7030 costs 40 ms and
    6 MB to import, for these two types)."""

    componentType = namedtype.NamedTypes(
        namedtype.NamedType("attrType", univ.ObjectIdentifier()),
        namedtype.NamedType("attrValues", univ.SetOf(componentType=univ.Any())),
    )


class _AttrOrOID(univ.Choice):  # type: ignore[misc]
    """RFC 7030 4.5.2: AttrOrOID ::= CHOICE { oid OBJECT IDENTIFIER, attribute Attribute }"""

    componentType = namedtype.NamedTypes(
        namedtype.NamedType("oid", univ.ObjectIdentifier()),
        namedtype.NamedType("attribute", _Attribute()),
    )


def oid_name(oid: str) -> str:
    return f"{_NAMES[oid]} ({oid})" if oid in _NAMES else _clip(oid)


@dataclass(frozen=True)
class CsrAttrsHints:
    """What the server asked for, reduced to what the agent understands."""

    key_type: str | None = None  # "ec" or "rsa"
    key_algorithm: KeyAlgorithm | None = None  # when the curve or size is named and supported
    hash_name: str | None = None  # "sha256" | "sha384" | "sha512"
    subject_oids: frozenset[str] = frozenset()
    pop_requested: bool = False
    ignored: tuple[str, ...] = ()


#: items of a CsrAttrs looked at; real servers send a handful, a hostile one 95,000 (1 MiB)
MAX_ITEMS = 64
#: bytes of one item decoded (an Attribute with its values); larger ones are skipped
MAX_ITEM_BYTES = 4096
#: values of one attribute looked at
MAX_VALUES = 8
#: entries kept in `ignored` (the rest counted), and characters of each: the log line is bounded
MAX_REPORTED = 16
MAX_REPORTED_CHARS = 120
#: an RSA size has at most this many bytes (a 2000-byte INTEGER would be 4800 digits, and
#: Python refuses str() beyond 4300)
MAX_INTEGER_BYTES = 8


def parse_csrattrs(der: bytes) -> CsrAttrsHints:
    """Parse a DER CsrAttrs. Trailing bytes after the SEQUENCE (seen from real servers) are
    ignored with a log line; anything that is not a CsrAttrs, and any failure at all while
    reading it, is an EnrollmentError (the caller then ignores /csrattrs, RFC 7030 4.5).

    Bounded: at most MAX_ITEMS items of at most MAX_ITEM_BYTES each are decoded, at most
    MAX_REPORTED ignored items are reported, each at most MAX_REPORTED_CHARS long."""
    if not der:
        return CsrAttrsHints()
    try:
        return _parse(der)
    except EnrollmentError:
        raise
    except Exception as e:  # hostile input can make pyasn1 (or int -> str) raise anything
        raise EnrollmentError(f"/csrattrs: unusable ({_clip(type(e).__name__)})") from e


class _Hints:
    def __init__(self) -> None:
        self.key_type: str | None = None
        self.key_algorithm: KeyAlgorithm | None = None
        self.hash_name: str | None = None
        self.subject: set[str] = set()
        self.pop = False
        self.ignored: list[str] = []
        self.unreported = 0

    def ignore(self, what: str) -> None:
        if len(self.ignored) < MAX_REPORTED:
            self.ignored.append(_clip(what))
        else:
            self.unreported += 1

    def done(self) -> CsrAttrsHints:
        ignored = list(self.ignored)
        if self.unreported:
            ignored.append(f"{self.unreported} more")
        return CsrAttrsHints(
            key_type=self.key_type,
            key_algorithm=self.key_algorithm,
            hash_name=self.hash_name,
            subject_oids=frozenset(self.subject),
            pop_requested=self.pop,
            ignored=tuple(ignored),
        )


def _parse(der: bytes) -> CsrAttrsHints:
    tag, start, end = _tlv(der, 0)
    if tag != 0x30:
        raise EnrollmentError(f"/csrattrs: not a DER CsrAttrs: a tag 0x{tag:02x}, not a SEQUENCE")
    if end < len(der):
        log.info("/csrattrs: ignoring %d trailing bytes after the CsrAttrs", len(der) - end)
    hints = _Hints()
    position, count = start, 0
    while position < end:
        _tag, _start, item_end = _tlv(der, position, limit=end)
        element, position = der[position:item_end], item_end
        count += 1
        if count > MAX_ITEMS:
            hints.ignore(f"the items after the first {MAX_ITEMS}")
            break
        if len(element) > MAX_ITEM_BYTES:
            hints.ignore(f"an item of {len(element)} bytes")
            continue
        try:
            item, rest = der_decoder.decode(element, asn1Spec=_AttrOrOID())
        except PyAsn1Error as e:
            raise EnrollmentError(f"/csrattrs: not a DER CsrAttrs: {_clip(str(e))}") from e
        if rest:
            raise EnrollmentError("/csrattrs: not a DER CsrAttrs: bytes after an item")
        if item.getName() == "oid":
            _bare_oid(str(item["oid"]), hints)
        else:
            _attribute(item["attribute"], hints)
    return hints.done()


def _bare_oid(oid: str, hints: _Hints) -> None:
    """RFC 7030 4.5.2 / RFC 8951 3.4: an OID alone asks for that algorithm, attribute or
    proof-of-possession (challengePassword)."""
    if oid in _HASHES:
        hints.hash_name = _HASHES[oid]
    elif oid == EC_PUBLIC_KEY:
        hints.key_type = "ec"
    elif oid == RSA_ENCRYPTION:
        hints.key_type = "rsa"
    elif oid in _CURVES:  # a bare named curve: an EC key on it
        hints.key_type, hints.key_algorithm = "ec", _CURVES[oid]
    elif oid == CHALLENGE_PASSWORD:
        hints.pop = True
    elif oid in (SERIAL_NUMBER, COMMON_NAME):
        hints.subject.add(oid)
    else:
        hints.ignore(oid_name(oid))


def _attribute(attribute: univ.Asn1Item, hints: _Hints) -> None:
    oid = str(attribute["attrType"])
    all_values = attribute["attrValues"]
    if len(all_values) > MAX_VALUES:
        hints.ignore(f"{len(all_values) - MAX_VALUES} values of {oid_name(oid)} beyond the first")
    values = [bytes(v) for v in list(all_values)[:MAX_VALUES]]
    if oid == EC_PUBLIC_KEY:
        hints.key_type = "ec"
        for value in values:
            curve = _decode(value, univ.ObjectIdentifier())
            if curve is not None and str(curve) in _CURVES:
                hints.key_algorithm = _CURVES[str(curve)]
            else:
                hints.ignore(f"id-ecPublicKey curve {curve} (not supported)")
    elif oid == RSA_ENCRYPTION:
        hints.key_type = "rsa"
        for value in values:
            size = _rsa_size(value)
            if size in _RSA_SIZES:
                hints.key_algorithm = _RSA_SIZES[size]
            else:
                shown = f"{size}" if size is not None else f"(not a small INTEGER, {len(value)} B)"
                hints.ignore(f"rsaEncryption size {shown} (not supported)")
    elif oid == EXTENSION_REQUEST:
        asked = [_decode(value, univ.ObjectIdentifier()) for value in values]
        names = ", ".join(oid_name(str(a)) for a in asked if a is not None) or "extensions"
        hints.ignore(f"extensionRequest for {names}")
    else:
        hints.ignore(f"attribute {oid_name(oid)}")


def _rsa_size(value: bytes) -> int | None:
    """An RSA key size from a DER INTEGER, never converting more than a few bytes."""
    if len(value) > 2 + MAX_INTEGER_BYTES:
        return None
    decoded = _decode(value, univ.Integer())
    return int(decoded) if decoded is not None else None


def _tlv(data: bytes, offset: int, *, limit: int | None = None) -> tuple[int, int, int]:
    """(tag, start of contents, end) of the DER element at `offset`; low tag numbers only."""
    limit = len(data) if limit is None else limit
    if offset + 2 > limit:
        raise EnrollmentError("/csrattrs: not a DER CsrAttrs: truncated")
    tag, first = data[offset], data[offset + 1]
    if tag & 0x1F == 0x1F:
        raise EnrollmentError("/csrattrs: not a DER CsrAttrs: a high tag number")
    position = offset + 2
    if first < 0x80:
        length = first
    else:
        size = first & 0x7F
        if size == 0 or size > 4 or position + size > limit:
            raise EnrollmentError("/csrattrs: not a DER CsrAttrs: a bad length")
        length = int.from_bytes(data[position : position + size], "big")
        position += size
    if position + length > limit:
        raise EnrollmentError("/csrattrs: not a DER CsrAttrs: truncated")
    return tag, position, position + length


def _decode(value: bytes, spec: univ.Asn1Item) -> univ.Asn1Item | None:
    try:
        decoded, _rest = der_decoder.decode(value, asn1Spec=spec)
    except PyAsn1Error:
        return None
    return decoded


def _clip(text: str) -> str:
    return text if len(text) <= MAX_REPORTED_CHARS else text[: MAX_REPORTED_CHARS - 3] + "..."


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
