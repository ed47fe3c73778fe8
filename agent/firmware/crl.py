"""`firmware crl refresh`: fetch the firmware PKI's CRLs, judge each, keep the good ones.

Where from: the CRL distribution points (URIs) in the certificates of `firmware.trust_anchors`
and `firmware.crl_issuers`, then `firmware.crl_urls`. Each CRL is judged (`judge`, no I/O)
before it is stored: its issuer must be a trust anchor or a configured CRL issuer, its
signature must verify with that issuer's key, now must lie within thisUpdate..nextUpdate
(a CRL without nextUpdate is refused: it could never be seen as stale), and it must not be
older than the CRL of the same issuer already stored (a lower CRL number, or, without numbers,
an earlier thisUpdate): a replayed old CRL would un-revoke a signer. A refused CRL changes
nothing; the stored one is kept. Stored CRLs are DER, one file per issuer (`crl_file_name`),
replaced atomically in `firmware.crl_dir` (a root-owned FileStore) under its lock; the verifier
reads them besides `firmware.crl_files` and, like those, refuses a stale one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.errors import AgentError, ChainValidationError, ConfigError
from hal.interfaces import FileStore

MAX_CRL_BYTES = 4 * 1024 * 1024
LOCK_FILE = "lock"
SUFFIX = ".crl"


def _time(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _who(name: x509.Name) -> str:
    return name.rfc4514_string() or "(empty name)"


def crl_file_name(issuer: x509.Name) -> str:
    """The stored CRL of `issuer`: one file per issuer name."""
    return "issuer-" + hashlib.sha256(issuer.public_bytes()).hexdigest()[:32] + SUFFIX


def parse_crl(data: bytes, source: str) -> x509.CertificateRevocationList:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as e:
        raise ChainValidationError(f"CRL {source} is not a valid CRL: {e}") from e


def crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def distribution_points(certs: Sequence[x509.Certificate]) -> list[str]:
    """http(s) URIs of the certificates' CRL distribution points, in order, without repeats."""
    urls: list[str] = []
    for cert in certs:
        try:
            cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        except x509.ExtensionNotFound:
            continue
        for point in cdp:
            for name in point.full_name or ():
                uri = name.value if isinstance(name, x509.UniformResourceIdentifier) else ""
                if uri.startswith(("http://", "https://")) and uri not in urls:
                    urls.append(uri)
    return urls


def _issued_by(cert: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(parent)
    except Exception:  # InvalidSignature, or a key type that cannot sign
        return False
    return True


def checked_issuers(
    anchors: Sequence[x509.Certificate],
    extra: Sequence[x509.Certificate],
    now: datetime,
    where: str,
) -> list[x509.Certificate]:
    """The anchors, and each `extra` CA issued (directly) by an anchor or by an extra CA
    already accepted, valid now; anything else in `extra` is a configuration error."""
    accepted = list(anchors)
    todo = list(extra)
    while todo:
        progress = False
        for cert in list(todo):
            for parent in accepted:
                if cert.issuer != parent.subject:
                    continue
                if not _issued_by(cert, parent):
                    continue
                try:
                    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
                    is_ca = bc.ca
                except x509.ExtensionNotFound:
                    is_ca = False
                if not is_ca:
                    raise ConfigError(f"{where}: {_who(cert.subject)} is not a CA certificate")
                if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                    raise ConfigError(f"{where}: {_who(cert.subject)} is not valid now")
                accepted.append(cert)
                todo.remove(cert)
                progress = True
                break
        if not progress:
            raise ConfigError(
                f"{where}: {_who(todo[0].subject)} is not issued by a firmware trust anchor "
                "(or by another CA of this file)"
            )
    return accepted


def judge(
    crl: x509.CertificateRevocationList,
    *,
    source: str,
    issuers: Sequence[x509.Certificate],
    stored: x509.CertificateRevocationList | None,
    now: datetime,
) -> x509.Certificate:
    """Whether `crl` may replace `stored`: return its issuer, or raise ChainValidationError."""
    candidates = [c for c in issuers if c.subject == crl.issuer]
    if not candidates:
        raise ChainValidationError(
            f"CRL {source} is from the wrong issuer: {_who(crl.issuer)} is neither a firmware "
            "trust anchor nor in firmware.crl_issuers"
        )
    issuer = next(
        (c for c in candidates if crl.is_signature_valid(c.public_key())),  # type: ignore[arg-type]
        None,
    )
    if issuer is None:
        raise ChainValidationError(
            f"CRL {source} has a bad signature: it does not verify with the key of its issuer "
            f"{_who(crl.issuer)}"
        )
    if now < crl.last_update_utc:
        raise ChainValidationError(
            f"CRL {source} is not yet valid: its thisUpdate is {_time(crl.last_update_utc)}"
        )
    if crl.next_update_utc is None:
        raise ChainValidationError(f"CRL {source} has no nextUpdate: it could never go stale")
    if now > crl.next_update_utc:
        raise ChainValidationError(
            f"CRL {source} is expired: its nextUpdate was {_time(crl.next_update_utc)}"
        )
    if stored is not None:
        new, old = crl_number(crl), crl_number(stored)
        if new is not None and old is not None:
            if new < old:
                raise ChainValidationError(
                    f"CRL {source} is older than the stored one: CRL number {new} < {old}"
                )
        elif crl.last_update_utc < stored.last_update_utc:
            raise ChainValidationError(
                f"CRL {source} is older than the stored one: thisUpdate "
                f"{_time(crl.last_update_utc)} < {_time(stored.last_update_utc)}"
            )
    return issuer


@dataclass(frozen=True)
class Outcome:
    url: str
    #: what was stored, or None when refused (then `error` says why)
    crl: x509.CertificateRevocationList | None = None
    error: AgentError | None = None

    def line(self) -> str:
        if self.crl is None:
            return f"{self.error}; the stored CRL is kept"
        number = crl_number(self.crl)
        nxt = self.crl.next_update_utc
        return (
            f"stored CRL {self.url}: issuer {_who(self.crl.issuer)}"
            + (f", CRL number {number}" if number is not None else "")
            + f", {len(self.crl)} revoked, next update {_time(nxt) if nxt else '?'}"
        )


def _stored(data: bytes | None, where: str) -> x509.CertificateRevocationList | None:
    """The stored CRL; a damaged file (only root writes there) is replaced, not obeyed."""
    if not data:
        return None
    try:
        return parse_crl(data, where)
    except ChainValidationError:
        return None


def refresh(
    urls: Sequence[str],
    *,
    issuers: Sequence[x509.Certificate],
    store: FileStore,
    fetch: Callable[[str, int], bytes],
    now: Callable[[], datetime],
    shown: Callable[[str], str] = str,
) -> list[Outcome]:
    """Fetch, judge and store each URL's CRL; one outcome per URL, in order."""
    outcomes: list[Outcome] = []
    with store.lock(LOCK_FILE):
        for url in urls:
            where = shown(url)
            try:
                crl = parse_crl(fetch(url, MAX_CRL_BYTES), where)
                name = crl_file_name(crl.issuer)
                old_bytes = store.read(name, limit=MAX_CRL_BYTES)
                stored = _stored(old_bytes, str(store.path(name)))
                judge(crl, source=where, issuers=issuers, stored=stored, now=now())
                store.write(name, crl.public_bytes(serialization.Encoding.DER), mode=0o644)
                outcomes.append(Outcome(url=where, crl=crl))
            except AgentError as e:
                outcomes.append(Outcome(url=where, error=e))
    return outcomes
