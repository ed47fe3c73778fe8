"""RFC 5280 6.1 certification path validation for private PKIs (pure).

cryptography's `x509.verification` applies its CA extension policy to the trust anchor itself
and insists that every CA policy require basicConstraints, so a version 1 root, or a root
without basicConstraints, can never be an anchor there (`ValueError: A CA extension policy must
require the basicConstraints extension to be present`). RFC 5280 takes the anchor as an *input*
(its name and key; its constraints where the relying party chooses), which is what private PKIs
rely on. So the path is walked here, with cryptography doing the parsing and the signature
checks (`verify_directly_issued_by`). The policy, in short (docs/est.md has it in full):

- the anchor: any certificate in the anchor set; its own signature, version and unknown
  extensions are not looked at; its basicConstraints (cA, pathLen), keyUsage (keyCertSign),
  extendedKeyUsage and nameConstraints are honoured when present; it must be valid now;
- every intermediate: version 3 with basicConstraints cA=TRUE (critical or not), keyCertSign
  when it has a keyUsage, pathLen honoured, the purpose in its extendedKeyUsage when it has one,
  no critical extension we do not understand, valid now, signed with SHA-256 or better;
- the end entity: signed like an intermediate, valid now, no unknown critical extension, its
  subject and subjectAltName within every nameConstraints above it;
- certificate policies are not processed (user-initial-policy-set = anyPolicy,
  initial-explicit-policy false, which makes them irrelevant to the outcome), except that a
  requireExplicitPolicy is refused rather than ignored.

`now ± skew` is accepted for every validity period: devices' clocks are not exact.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from agent.errors import ChainValidationError

MAX_DEPTH = 8  # certificates between the end entity and the anchor, at most
MAX_SIGNATURE_CHECKS = 256  # per validation: many same-named certificates cannot make it slow
MIN_RSA_BITS = 2048
_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)

#: extensions whose meaning this walker knows (processed, or irrelevant to the outcome)
UNDERSTOOD = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.ISSUER_ALTERNATIVE_NAME,
        ExtensionOID.NAME_CONSTRAINTS,
        ExtensionOID.CERTIFICATE_POLICIES,
        ExtensionOID.POLICY_CONSTRAINTS,
        ExtensionOID.POLICY_MAPPINGS,
        ExtensionOID.INHIBIT_ANY_POLICY,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.CRL_DISTRIBUTION_POINTS,
        ExtensionOID.FRESHEST_CRL,
        ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
        ExtensionOID.SUBJECT_INFORMATION_ACCESS,
        ExtensionOID.SUBJECT_DIRECTORY_ATTRIBUTES,
    }
)

_E = TypeVar("_E", bound=x509.ExtensionType)

# cryptography parses lazily: a malformed part raises on first access
_MALFORMED = (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


class PathError(ChainValidationError):
    """No path from the certificate to an anchor satisfies RFC 5280 and our policy."""


@dataclass(frozen=True)
class Path:
    #: end entity first, the anchor last
    certificates: tuple[x509.Certificate, ...]

    @property
    def above(self) -> tuple[x509.Certificate, ...]:
        """The issuing chain above the end entity, nearest first, the anchor last."""
        return self.certificates[1:]


def validate_path(
    leaf: x509.Certificate,
    *,
    anchors: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate] = (),
    now: datetime,
    skew: timedelta,
    purpose: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
) -> Path:
    """The first path from `leaf` to one of `anchors` that passes every check, or PathError
    with the reason of the candidate that got furthest."""
    anchor_set = [a for a in anchors]
    pool = _unique([*anchor_set, *intermediates])
    reasons: list[tuple[int, str]] = []
    budget = [MAX_SIGNATURE_CHECKS]

    def is_anchor(cert: x509.Certificate) -> bool:
        return any(cert == a for a in anchor_set)

    def walk(path: list[x509.Certificate]) -> Path | None:
        child = path[-1]
        candidates = [c for c in pool if _issuer_candidate(child, c) and c not in path]
        candidates.sort(key=lambda c: not is_anchor(c))
        if not candidates:
            missing = f"no issuer {_name(child.issuer)!r} among the CA certificates"
            reasons.append((len(path), missing))
        for issuer in candidates:
            budget[0] -= 1
            if budget[0] < 0:
                raise PathError(f"no path found within {MAX_SIGNATURE_CHECKS} signature checks")
            problem = _signed_by(child, issuer)
            if problem is not None:
                reasons.append((len(path), problem))
                continue
            if is_anchor(issuer):
                full = [*path, issuer]
                try:
                    check_path(full, now=now, skew=skew, purpose=purpose)
                except PathError as e:
                    reasons.append((len(full) + 10, str(e)))
                    continue
                return Path(tuple(full))
            if len(path) > MAX_DEPTH:
                reasons.append((len(path), f"no anchor within {MAX_DEPTH} certificates"))
                continue
            found = walk([*path, issuer])
            if found is not None:
                return found
        return None

    found = walk([leaf])
    if found is not None:
        return found
    reason = max(reasons, key=lambda r: r[0])[1] if reasons else "no path"
    raise PathError(reason)


def check_path(
    path: Sequence[x509.Certificate],
    *,
    now: datetime,
    skew: timedelta,
    purpose: x509.ObjectIdentifier,
) -> None:
    """RFC 5280 6.1 over one candidate path (end entity first, anchor last); signatures are
    checked by the caller."""
    anchor = path[-1]
    for cert in path:
        _check_time(cert, now, skew, what="the trust anchor" if cert is anchor else None)
    for depth, ca in enumerate(path[1:], start=1):
        # `depth` certificates lie below `ca`; the non-self-issued intermediates among them
        # count against its pathLen (RFC 5280 6.1.4 (l), (m))
        is_anchor = ca is anchor
        _check_ca(ca, anchor=is_anchor, child=path[depth - 1], purpose=purpose)
        constraints = _ext(ca, x509.BasicConstraints)
        if constraints is not None and constraints.path_length is not None:
            below = sum(1 for c in path[1:depth] if not _self_issued(c))
            if below > constraints.path_length:
                raise PathError(
                    f"{_who(ca)} allows {constraints.path_length} intermediate CA(s) below it "
                    f"(basicConstraints pathLen), the path has {below}"
                )
    for cert in path[:-1]:
        _check_critical(cert)
        _check_policy_constraints(cert)
    _check_name_constraints(path)


def _check_time(
    cert: x509.Certificate, now: datetime, skew: timedelta, *, what: str | None
) -> None:
    who = what or _who(cert)
    if now + skew < cert.not_valid_before_utc:
        raise PathError(f"{who} is not valid before {cert.not_valid_before_utc.isoformat()}")
    if now - skew > cert.not_valid_after_utc:
        raise PathError(f"{who} expired at {cert.not_valid_after_utc.isoformat()}")


def _check_ca(
    ca: x509.Certificate, *, anchor: bool, child: x509.Certificate, purpose: x509.ObjectIdentifier
) -> None:
    role = "the trust anchor" if anchor else "the CA certificate"
    who = f"{role} {_name(ca.subject)!r}"
    constraints = _ext(ca, x509.BasicConstraints)
    if constraints is None:
        if not anchor:  # 6.1.4 (k): v1/v2 intermediates are refused, v3 need the extension
            raise PathError(
                f"{who} is not marked as a CA (no basicConstraints) and cannot issue "
                f"{_name(child.subject)!r}"
            )
    elif not constraints.ca:
        raise PathError(
            f"{who} is not a CA (basicConstraints cA=FALSE) and cannot issue "
            f"{_name(child.subject)!r}"
        )
    usage = _ext(ca, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        raise PathError(f"{who} has a keyUsage without keyCertSign: it may not sign certificates")
    eku = _ext(ca, x509.ExtendedKeyUsage)
    if eku is not None and not {purpose, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE} & set(eku):
        raise PathError(
            f"{who} restricts its extendedKeyUsage to {_ekus(eku)}, not {_eku_name(purpose)}"
        )
    if not anchor and ca.version is not x509.Version.v3:
        raise PathError(f"{who} is a {ca.version.name} certificate: only an anchor may be one")
    try:
        key = ca.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise PathError(f"{who} has a public key that cannot be used: {e}") from e
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise PathError(f"{who} has an RSA key of {key.key_size} bits (< {MIN_RSA_BITS})")


def _signed_by(child: x509.Certificate, issuer: x509.Certificate) -> str | None:
    """None when `issuer`'s key made `child`'s signature with an accepted hash, else why not."""
    try:
        algorithm = child.signature_hash_algorithm
    except UnsupportedAlgorithm as e:
        return f"{_who(child)} has an unsupported signature algorithm ({e})"
    if algorithm is not None and not isinstance(algorithm, _HASHES):
        return (
            f"{_who(child)} is signed with {algorithm.name.upper()}, which is refused (only a "
            "trust anchor's own signature is not checked)"
        )
    try:
        child.verify_directly_issued_by(issuer)
    except InvalidSignature:
        return f"the signature on {_who(child)} does not verify with the key of {_who(issuer)}"
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        return f"cannot check the signature on {_who(child)} with {_who(issuer)}: {e}"
    return None


def _issuer_candidate(child: x509.Certificate, cert: x509.Certificate) -> bool:
    if cert.subject != child.issuer:
        return False
    aki = _ext_quiet(child, x509.AuthorityKeyIdentifier)
    ski = _ext_quiet(cert, x509.SubjectKeyIdentifier)
    if aki is not None and aki.key_identifier is not None and ski is not None:
        return aki.key_identifier == ski.digest
    return True


def _check_critical(cert: x509.Certificate) -> None:
    check_critical(cert, who=_who(cert))


def check_critical(
    cert: x509.Certificate, *, who: str, fail: Callable[[str], Exception] = PathError
) -> None:
    """Refuse (with `fail`) a certificate that carries a critical extension this agent does not
    understand, or whose extensions do not parse; `who` names it in the message."""
    try:
        extensions = list(cert.extensions)
    except _MALFORMED as e:
        raise fail(f"{who} has malformed extensions: {e}") from e
    for ext in extensions:
        if ext.critical and ext.oid not in UNDERSTOOD:
            raise fail(
                f"{who} carries a critical extension this agent does not understand "
                f"({ext.oid.dotted_string})"
            )


def _check_policy_constraints(cert: x509.Certificate) -> None:
    constraints = _ext(cert, x509.PolicyConstraints)
    if constraints is not None and constraints.require_explicit_policy is not None:
        raise PathError(
            f"{_who(cert)} sets policyConstraints requireExplicitPolicy; certificate policy "
            "processing is not supported, so the path is refused rather than half-checked"
        )


# -- name constraints (RFC 5280 4.2.1.10, 6.1.4 (g)) -------------------------------------------


def _check_name_constraints(path: Sequence[x509.Certificate]) -> None:
    """Each certificate below a CA with nameConstraints (self-issued intermediates excepted)
    has its subject and subjectAltName names checked against them."""
    anchor_first = list(reversed(path))
    active: list[tuple[x509.Certificate, x509.NameConstraints]] = []
    for index, cert in enumerate(anchor_first):
        if index > 0 and active and (cert is path[0] or not _self_issued(cert)):
            names = _names_of(cert)
            for ca, constraints in active:
                for name in names:
                    _check_name(name, constraints, cert, ca)
        nc = _ext(cert, x509.NameConstraints)
        if nc is not None and cert is not path[0]:
            active.append((cert, nc))


def _names_of(cert: x509.Certificate) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    if len(cert.subject) > 0:
        names.append(x509.DirectoryName(cert.subject))
        names += [
            x509.RFC822Name(str(a.value))
            for a in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)
        ]
    san = _ext(cert, x509.SubjectAlternativeName)
    if san is not None:
        names += list(san)
    return names


_SUPPORTED = (x509.DNSName, x509.IPAddress, x509.RFC822Name, x509.UniformResourceIdentifier,
              x509.DirectoryName)  # fmt: skip


def _check_name(
    name: x509.GeneralName, nc: x509.NameConstraints, cert: x509.Certificate, ca: x509.Certificate
) -> None:
    kind = type(name)
    excluded = [s for s in nc.excluded_subtrees or () if type(s) is kind]
    permitted = [s for s in nc.permitted_subtrees or () if type(s) is kind]
    if (excluded or permitted) and not isinstance(name, _SUPPORTED):
        raise PathError(
            f"{_who(ca)} constrains {kind.__name__} names, which this agent cannot check, and "
            f"{_who(cert)} has one"
        )
    shown = _show(name)
    for subtree in excluded:
        if _matches(name, subtree):
            raise PathError(f"{_who(cert)}: name {shown} is excluded by the nameConstraints of "
                            f"{_who(ca)}")  # fmt: skip
    if permitted and not any(_matches(name, subtree) for subtree in permitted):
        raise PathError(
            f"{_who(cert)}: name {shown} is outside the permitted nameConstraints of {_who(ca)}"
        )


def _matches(name: x509.GeneralName, subtree: x509.GeneralName) -> bool:
    if isinstance(name, x509.DNSName) and isinstance(subtree, x509.DNSName):
        return _dns_within(name.value, subtree.value)
    if isinstance(name, x509.IPAddress) and isinstance(subtree, x509.IPAddress):
        address, network = name.value, subtree.value
        if not isinstance(network, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            return False
        if not isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return False
        return address.version == network.version and address in network
    if isinstance(name, x509.RFC822Name) and isinstance(subtree, x509.RFC822Name):
        mailbox, constraint = name.value.lower(), subtree.value.lower()
        if "@" in constraint:
            return mailbox == constraint
        host = mailbox.rpartition("@")[2]
        if constraint.startswith("."):
            return host.endswith(constraint)
        return host == constraint
    if isinstance(name, x509.UniformResourceIdentifier) and isinstance(
        subtree, x509.UniformResourceIdentifier
    ):
        host = (urlsplit(name.value).hostname or "").lower()
        constraint = subtree.value.lower()
        if not host:
            return False
        if constraint.startswith("."):
            return host.endswith(constraint)
        return host == constraint
    if isinstance(name, x509.DirectoryName) and isinstance(subtree, x509.DirectoryName):
        have, want = list(name.value.rdns), list(subtree.value.rdns)
        return have[: len(want)] == want
    return False


def _dns_within(host: str, constraint: str) -> bool:
    host, constraint = host.lower().rstrip("."), constraint.lower().rstrip(".")
    if not constraint:
        return True
    if constraint.startswith("."):
        return host.endswith(constraint)
    return host == constraint or host.endswith("." + constraint)


def _show(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DirectoryName):
        return repr(_name(name.value))
    return f"{type(name).__name__}:{name.value!s}"


# -- helpers ------------------------------------------------------------------------------------


def _self_issued(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer


def _ext(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    return extension(cert, kind, who=_who(cert))


def extension(
    cert: x509.Certificate,
    kind: type[_E],
    *,
    who: str,
    fail: Callable[[str], Exception] = PathError,
) -> _E | None:
    """The value of `cert`'s extension of `kind`, None when absent; malformed ones are refused
    with `fail` (cryptography parses extensions lazily, and raises on first access)."""
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except _MALFORMED as e:
        raise fail(f"{who} has malformed extensions: {e}") from e


def _ext_quiet(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return _ext(cert, kind)
    except PathError:
        return None


def _unique(certs: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    seen: list[x509.Certificate] = []
    for cert in certs:
        if cert not in seen:
            seen.append(cert)
    return seen


_EKU_NAMES = {
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}


def _eku_name(oid: x509.ObjectIdentifier) -> str:
    return _EKU_NAMES.get(oid, oid.dotted_string)


def _ekus(eku: x509.ExtendedKeyUsage) -> str:
    return ", ".join(_eku_name(o) for o in eku)


def _name(name: x509.Name) -> str:
    try:
        return name.rfc4514_string()
    except ValueError:
        return "(malformed name)"


def _who(cert: x509.Certificate) -> str:
    return f"certificate {_name(cert.subject)!r}"
