"""When to fetch /cacerts again, and what a fetched CA set may replace (pure).

The EST CA set (state_dir/cacerts.pem) is what issued certificates are validated against. A CA
that rolls its key over (RFC 7030 4.1.3, with CMP's root CA key update certificates, RFC 4210
4.4) must reach every device before the first certificate under the new key does, so the service
fetches /cacerts on a schedule, not only when a renewal fails to validate.

- **When.** A refresh point once per `interval`, at an offset drawn from a hash of the device id
  and the stored set's fingerprint, on a grid counted from the Unix epoch: a restart lands on the
  same point, and a fleet spreads over the interval instead of asking at the same minute. As the
  earliest notAfter of the stored set nears, the interval shrinks (to a share of the time left,
  never below `retry_min`), so a set about to expire is looked at more often.
- **After a failure**: exponential backoff with full jitter from `retry_min` doubling to
  `retry_max` (never beyond the interval), drawn from the same hash and the failure count; after
  a refused set (a security event) the cap at once: reported, never hammered.
- **What a fetched set may do** (`judge`): it is bounded and parsed; only certificates valid now
  are kept, and only those that chain to the trust the agent already has: the explicit anchor
  (est.trust_anchor or the bootstrapped state_dir/est-anchor.pem) and the roots of the stored
  set, which were themselves accepted that way. RFC 7030 4.1.3 rollover: a new self-signed root
  (NewWithNew) is accepted only when the set carries a NewWithOld certificate (the new key,
  signed by a trusted root) that validates; OldWithNew (the old key signed by the new) is kept
  once the new root is. A set in which nothing chains to that trust is refused as a trust
  failure, and the stored set stays as it was. Never trust-on-first-use again. Enrollment
  judges the /cacerts answers it fetches with the same function (agent/enroll.py; on a first
  enrollment the root the issued certificate validates under may join the anchors).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.errors import ChainValidationError, EnrollmentError
from agent.est.memory import ca_set_sha256
from agent.pki import public_key_der
from agent.pkix import PathError, validate_path
from agent.validity import validity

__all__ = ["MAX_CA_CERTS", "RefreshPolicy", "Verdict", "earliest_expiry", "judge", "next_refresh"]

#: a /cacerts answer with more certificates than this is refused (a CA set is a handful)
MAX_CA_CERTS = 32
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class RefreshPolicy:
    #: the regular refresh interval (seconds); 0 = no scheduled refresh
    interval_seconds: float = 86400.0
    #: backoff after failures: full jitter, the cap doubling from min to max (seconds)
    retry_min_seconds: float = 60.0
    retry_max_seconds: float = 4 * 3600.0
    #: as the stored set's earliest expiry nears, refresh at least every this share of the
    #: time left
    share_of_time_left: float = 0.25


def _unit(*parts: object) -> float:
    """A number in [0, 1) from a hash of `parts`: deterministic, spread like a uniform draw."""
    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def earliest_expiry(certs: Sequence[x509.Certificate]) -> datetime | None:
    return min((c.not_valid_after_utc for c in certs), default=None)


def _period(policy: RefreshPolicy, now: datetime, expiry: datetime | None) -> float:
    period = policy.interval_seconds
    if expiry is not None:
        left = (expiry - now).total_seconds()
        period = min(period, max(policy.retry_min_seconds, left * policy.share_of_time_left))
    return max(period, 1.0)


def next_refresh(
    *,
    device_id: str,
    ca_set: str,
    now: datetime,
    last_attempt: datetime | None,
    failures: int,
    expiry: datetime | None,
    policy: RefreshPolicy,
    security: bool = False,
) -> datetime | None:
    """When to fetch /cacerts next (None: scheduled refreshes are off).

    `ca_set`: the stored set's fingerprint; `last_attempt`: when this run last tried (None:
    not yet); `failures`: consecutive failed refreshes; `expiry`: the stored set's earliest
    notAfter; `security`: the last failure was a refused set (waits the cap: never hammered)."""
    if policy.interval_seconds <= 0:
        return None
    period = _period(policy, now, expiry)
    if failures > 0 and last_attempt is not None:
        doublings = min(failures - 1, 62)
        cap = min(policy.retry_max_seconds, policy.retry_min_seconds * 2.0**doublings, period)
        if security:
            cap = min(policy.retry_max_seconds, period)
        low = cap if security else min(policy.retry_min_seconds, cap)
        wait = low + _unit("ca-backoff", device_id, ca_set, failures) * (cap - low)
        return last_attempt + timedelta(seconds=wait)
    offset = _unit("ca-refresh", device_id, ca_set) * period
    base = last_attempt if last_attempt is not None else now
    since = (base - _EPOCH).total_seconds() - offset
    slot = (since // period + 1) * period + offset
    return _EPOCH + timedelta(seconds=slot)


@dataclass(frozen=True)
class Verdict:
    """A fetched set that may replace the stored one."""

    certificates: tuple[x509.Certificate, ...]
    sha256: str
    previous_sha256: str
    #: roots adopted through an RFC 7030 4.1.3 NewWithOld certificate
    new_roots: tuple[x509.Certificate, ...]
    #: one line per certificate of the answer that was not kept, and why
    dropped: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return self.sha256 != self.previous_sha256


def _spki(cert: x509.Certificate) -> bytes | None:
    try:
        return public_key_der(cert.public_key())
    except (ValueError, UnsupportedAlgorithm):
        return None


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return cert.version is x509.Version.v1 and _self_signed(cert)
    except ValueError:
        return False
    return bc.ca


def _who(cert: x509.Certificate) -> str:
    try:
        return repr(cert.subject.rfc4514_string())
    except ValueError:
        return "(malformed subject)"


def judge(
    fetched: Sequence[x509.Certificate],
    *,
    anchors: Sequence[x509.Certificate],
    current: Sequence[x509.Certificate],
    now: datetime,
    skew: timedelta,
) -> Verdict:
    """The part of a /cacerts answer (fetched over TLS verified by `anchors`) that may replace
    the stored set `current` (empty: none stored yet), in the answer's order. Raises
    EnrollmentError for an answer out of bounds or with nothing valid, ChainValidationError when
    nothing in it chains to the trust the agent has.

    The one judgement of a fetched set: the scheduled refresh (agent/ca_service.py) and
    enrollment when it fetches /cacerts (agent/enroll.py; on a first enrollment, with no stored
    set, the root that issued the device's certificate may join `anchors`: docs/est.md)."""
    if len(fetched) > MAX_CA_CERTS:
        raise EnrollmentError(f"/cacerts: {len(fetched)} certificates, more than {MAX_CA_CERTS}")
    dropped: list[str] = []
    valid = []
    for cert in fetched:
        if not validity(cert, now, skew).valid:
            dropped.append(f"{_who(cert)}: not valid now ({cert.not_valid_after_utc:%Y-%m-%d})")
        elif not _is_ca(cert):
            dropped.append(f"{_who(cert)}: not a CA certificate")
        else:
            valid.append(cert)
    if not valid:
        raise EnrollmentError("/cacerts: none of the certificates is a CA certificate valid now")
    # each self-signature checked once (the loop below asks again and again)
    roots = {id(c) for c in [*valid, *current] if _self_signed(c)}
    trusted = [*anchors, *(c for c in current if id(c) in roots)]
    trusted_keys = {(c.subject, _spki(c)) for c in trusted}
    accepted: list[x509.Certificate] = []
    new_roots: list[x509.Certificate] = []
    pending = list(valid)
    progress = True
    while pending and progress:  # a new root makes more of the rest chain: to a fixpoint
        progress = False
        for cert in list(pending):
            ok = False
            if any(cert == a for a in anchors):
                ok = True  # an anchor itself, a root or not (an intermediate as the anchor)
            elif id(cert) in roots:
                if (cert.subject, _spki(cert)) in trusted_keys:
                    ok = True  # a root we trust already (OldWithOld)
                elif _vouched(cert, [c for c in accepted if id(c) not in roots]):
                    ok = True  # NewWithNew, vouched for by an accepted NewWithOld
                    new_roots.append(cert)
                    trusted.append(cert)
                    trusted_keys.add((cert.subject, _spki(cert)))
            else:
                ok = _chains(cert, trusted, valid, now, skew)
            if ok:
                accepted.append(cert)
                pending.remove(cert)
                progress = True
    dropped += [f"{_who(c)}: does not chain to the trust anchor" for c in pending]
    if not accepted:
        trust, kept = (
            ("the trust anchor or the stored CA set", "the stored CA set is kept")
            if current
            else ("the trust anchor", "no CA set is stored")
        )
        raise ChainValidationError(
            f"/cacerts: none of the {len(fetched)} certificate(s) chains to {trust} ("
            + "; ".join(dropped)
            + f"); {kept}"
        )
    order = {id(c): i for i, c in enumerate(valid)}
    accepted.sort(key=lambda c: order[id(c)])  # as the server sent them
    return Verdict(
        certificates=tuple(accepted),
        sha256=ca_set_sha256(accepted),
        previous_sha256=ca_set_sha256(current) if current else "",
        new_roots=tuple(new_roots),
        dropped=tuple(dropped),
    )


def _vouched(root: x509.Certificate, links: Sequence[x509.Certificate]) -> bool:
    """An accepted link certificate carries this root's name and key (NewWithOld)."""
    key = _spki(root)
    return any(c.subject == root.subject and _spki(c) == key for c in links)


def _chains(
    cert: x509.Certificate,
    trusted: Sequence[x509.Certificate],
    pool: Sequence[x509.Certificate],
    now: datetime,
    skew: timedelta,
) -> bool:
    try:
        validate_path(
            cert,
            anchors=trusted,
            intermediates=[c for c in pool if c is not cert],
            now=now,
            skew=skew,
            purpose=ExtendedKeyUsageOID.CLIENT_AUTH,
        )
    except (PathError, ChainValidationError):
        return False
    return True
