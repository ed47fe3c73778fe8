"""The EST operations (RFC 7030 4.1-4.5) over an injected `Transport`.

The client speaks HTTP and returns parsed answers; it decides nothing about keys or disk. The
enrollment body is built by a callback *inside* the connection, after the handshake, so the CSR
can carry that connection's tls-unique (proof-of-possession, RFC 7030 3.5) and be signed by the
key store only then.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cryptography import x509

from agent.clock import Clock, SystemClock
from agent.config import ProofOfPossession
from agent.errors import EnrollmentError, TransportError
from agent.est import wire
from agent.est.auth import BasicCredentials
from agent.est.response import parse_certs_only
from agent.est.transport import (
    ERROR_BODY_BYTES,
    ClientIdentity,
    Connection,
    HttpResponse,
    Transport,
)

log = logging.getLogger(__name__)

#: builds the DER CSR for this connection; the argument is the challengePassword (tls-unique,
#: base64) or None when proof-of-possession is not used
CsrFactory = Callable[[str | None], bytes]


@dataclass(frozen=True)
class EnrollOutcome:
    """What /simpleenroll or /simplereenroll answered."""

    certificates: tuple[x509.Certificate, ...]  # empty when pending
    pending: bool
    retry_after: str | None  # the raw Retry-After header of a 202
    csr_der: bytes  # the CSR that was sent (to resubmit the same one after a 202)
    proof_of_possession: bool
    tls_version: str
    handshake_seconds: float
    csr_seconds: float
    server_seconds: float


class EstClient:
    def __init__(
        self,
        *,
        transport: Transport,
        prefix: str = "",
        label: str = "",
        credentials: BasicCredentials | None = None,
        send_credentials_upfront: bool = False,
        client_identity: ClientIdentity | None = None,
        max_tls_version: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._transport = transport
        self._clock = clock or SystemClock()
        self._base = f"{prefix}/.well-known/est" + (f"/{label}" if label else "")
        self._credentials = credentials
        self._upfront = send_credentials_upfront
        self._identity = client_identity
        self._max_tls = max_tls_version
        self._session: bool = False
        self._reused = False
        self._open: tuple[tuple[object, ...], Connection, contextlib.ExitStack] | None = None
        #: counted for `enroll -v` and the bench
        self.requests = 0
        self.connections = 0
        #: a request of ours was answered with a Basic challenge (remembered by the caller)
        self.basic_demanded = False

    def path(self, operation: str) -> str:
        return f"{self._base}/{operation}"

    # -- one kept-alive connection per operation ----------------------------------------------

    def __enter__(self) -> EstClient:
        """Within `with client:` requests share one TLS connection while the server keeps it
        open (and its parameters fit); outside, each request has its own."""
        self._session = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._session = False
        self._close_open()

    def close_connection(self) -> None:
        """Close the kept-alive connection now (the next request opens a new one): its TLS
        context may hold a TPM object slot that the caller needs for a moment."""
        self._close_open()

    def _close_open(self) -> None:
        if self._open is not None:
            _key, _conn, stack = self._open
            self._open = None
            stack.close()

    @contextlib.contextmanager
    def _connection(
        self,
        *,
        client_identity: ClientIdentity | None,
        max_tls_version: str | None,
        provisional: bool = False,
    ) -> Iterator[Connection]:
        if not self._session:
            with self._transport.connect(
                client_identity=client_identity,
                max_tls_version=max_tls_version,
                provisional=provisional,
            ) as conn:
                self.connections += 1
                yield conn
            return
        key: tuple[object, ...] = (client_identity, max_tls_version, provisional)
        self._reused = False
        if self._open is not None and self._open[0] == key and _reusable(self._open[1]):
            log.debug("EST: reusing the kept-alive TLS connection")
            conn = self._open[1]
            self._reused = True
        else:
            self._close_open()
            stack = contextlib.ExitStack()
            conn = stack.enter_context(
                self._transport.connect(
                    client_identity=client_identity,
                    max_tls_version=max_tls_version,
                    provisional=provisional,
                )
            )
            self.connections += 1
            self._open = (key, conn, stack)
        try:
            yield conn
        except BaseException:
            self._close_open()  # never reuse a connection a request failed on
            raise
        if not _reusable(conn):
            self._close_open()

    def _request(
        self, conn: Connection, method: str, operation: str, headers: dict[str, str],
        body: bytes | None,
    ) -> HttpResponse:  # fmt: skip
        self.requests += 1
        reused = self._reused
        try:
            return conn.request(method, self.path(operation), headers=headers, body=body)
        except TransportError as e:
            if reused and e.status is None:
                # a server may close an idle kept-alive connection at any time (Apache after
                # 5 s; a slow TPM key generation takes longer): once more on a new one
                log.info("EST: the kept-alive connection failed (%s); reconnecting", e)
                raise _StaleConnection(str(e)) from e
            raise

    # -- the operations ------------------------------------------------------------------------

    def cacerts(self, *, provisional: bool = False) -> list[x509.Certificate]:
        """GET /cacerts: the EST CA certificates. `provisional`: bootstrap, server unverified."""
        what = "/cacerts"
        identity = None if provisional or not self._session else self._identity
        max_tls = None if provisional or not self._session else self._max_tls
        while True:  # once more after a stale kept-alive connection (never twice: a new one)
            try:
                with self._connection(
                    client_identity=identity, max_tls_version=max_tls, provisional=provisional
                ) as conn:
                    response = self._request(conn, "GET", "cacerts", _accept(wire.PKCS7_MIME), None)
                break
            except _StaleConnection:
                continue
        self._raise_for_status(response, what, credentials_sent=False)
        wire.check_media_type(response.headers, wire.PKCS7_TYPES, what)
        return parse_certs_only(wire.decode_body(response.body, response.headers, what), what)

    def csrattrs(self) -> bytes | None:
        """GET /csrattrs: DER CsrAttrs, or None when the server has none (204/404/501)."""
        what = "/csrattrs"
        response, _conn_info, _ = self._exchange(
            "GET", "csrattrs", what, body=None, max_tls_version=self._max_tls, accept=wire.CSRATTRS
        )
        if response.status in (204, 404, 501) or (response.status == 200 and not response.body):
            return None
        wire.check_media_type(response.headers, frozenset({wire.CSRATTRS}), what)
        return wire.decode_body(response.body, response.headers, what)

    def enroll(
        self,
        make_csr: CsrFactory,
        *,
        reenroll: bool,
        proof_of_possession: ProofOfPossession,
        client_identity: ClientIdentity | None = None,
    ) -> EnrollOutcome:
        """POST /simpleenroll (or /simplereenroll). Returns the certificates or `pending`."""
        operation = "simplereenroll" if reenroll else "simpleenroll"
        what = f"/{operation}"
        max_tls = "1.2" if proof_of_possession is ProofOfPossession.ALWAYS else self._max_tls
        response, conn_info, sent = self._exchange(
            "POST",
            operation,
            what,
            body=lambda conn: self._csr_body(conn, make_csr, proof_of_possession),
            max_tls_version=max_tls,
            accept=wire.PKCS7_MIME,
            client_identity=client_identity,
        )
        csr_der, pop_used, csr_seconds = sent
        certificates: tuple[x509.Certificate, ...] = ()
        if response.status == 200:
            wire.check_media_type(response.headers, wire.PKCS7_TYPES, what)
            der = wire.decode_body(response.body, response.headers, what)
            certificates = tuple(parse_certs_only(der, what))
        elif response.status != 202:
            raise EnrollmentError(
                f"{what}: unexpected HTTP {response.status} {response.reason}",
                status=response.status,
            )
        return EnrollOutcome(
            certificates=certificates,
            pending=response.status == 202,
            retry_after=response.header("retry-after") if response.status == 202 else None,
            csr_der=csr_der,
            proof_of_possession=pop_used,
            tls_version=conn_info[0],
            handshake_seconds=conn_info[1],
            csr_seconds=csr_seconds,
            server_seconds=response.elapsed_seconds,
        )

    # -- plumbing ------------------------------------------------------------------------------

    def _csr_body(
        self, conn: Connection, make_csr: CsrFactory, mode: ProofOfPossession
    ) -> tuple[bytes, tuple[bytes, bool, float]]:
        challenge: str | None = None
        if mode is not ProofOfPossession.NEVER:
            if conn.tls_unique is not None:
                challenge = base64.b64encode(conn.tls_unique).decode("ascii")
            elif mode is ProofOfPossession.ALWAYS:
                raise EnrollmentError(
                    f"proof_of_possession = always, but the connection is {conn.tls_version}, "
                    "which has no tls-unique"
                )
            else:
                log.info("%s has no tls-unique: enrolling without proof-of-possession",
                         conn.tls_version)  # fmt: skip
        started = self._clock.monotonic()
        der = make_csr(challenge)
        elapsed = self._clock.monotonic() - started
        return wire.encode_body(der), (der, challenge is not None, elapsed)

    def _exchange(
        self,
        method: str,
        operation: str,
        what: str,
        *,
        body: Callable[[Connection], tuple[bytes, tuple[bytes, bool, float]]] | None,
        max_tls_version: str | None,
        accept: str,
        client_identity: ClientIdentity | None = None,
    ) -> tuple[HttpResponse, tuple[str, float], tuple[bytes, bool, float]]:
        """One request, plus one retry with Basic credentials after a 401 Basic challenge.

        Credentials go only over a connection whose server certificate was verified, and only
        after a challenge unless `send_credentials_upfront`. The retry goes over the same
        connection when the server kept it open (within `with client:`), else a new one; the
        body (a proof-of-possession CSR) is rebuilt for the connection that carries it.
        """
        identity = client_identity or self._identity
        send_credentials = self._credentials is not None and self._upfront
        while True:
            try:
                with self._connection(
                    client_identity=identity, max_tls_version=max_tls_version
                ) as conn:
                    headers = _accept(accept)
                    payload: bytes | None = None
                    sent: tuple[bytes, bool, float] = (b"", False, 0.0)
                    if body is not None:
                        payload, sent = body(conn)
                        headers["Content-Type"] = wire.PKCS10
                        headers["Content-Transfer-Encoding"] = "base64"
                    if send_credentials and self._credentials is not None:
                        headers["Authorization"] = self._credentials.header()
                    response = self._request(conn, method, operation, headers, payload)
                    conn_info = (conn.tls_version, conn.handshake_seconds)
            except _StaleConnection:
                continue  # on a new connection, the body rebuilt for it
            if (
                response.status == 401
                and self._credentials is not None
                and not send_credentials
                and _basic_challenge(response)
            ):
                log.info("%s: server asked for HTTP Basic; retrying with credentials", what)
                send_credentials = True
                self.basic_demanded = True
                continue
            self._raise_for_status(response, what, credentials_sent=send_credentials)
            return response, conn_info, sent

    def _raise_for_status(
        self, response: HttpResponse, what: str, *, credentials_sent: bool
    ) -> None:
        status = response.status
        if status < 300 or (status in (404, 501) and what == "/csrattrs"):
            return
        detail = _snippet(response.body)
        cause = refusal_cause(response)
        if cause is not None and 400 <= status < 500:
            raise EnrollmentError(
                f"{what}: HTTP {status} {_printable(response.reason)}: {cause}" + detail,
                status=status,
            )
        if status == 401:
            challenge = _printable(response.header("www-authenticate") or "no WWW-Authenticate")
            if credentials_sent and _basic_challenge(response):
                message = f"{what}: HTTP 401: the server rejected our Basic credentials"
            elif self._credentials is None and "basic" in challenge.lower():
                message = (
                    f"{what}: HTTP 401: the server demands HTTP Basic ({challenge}), but "
                    "est.username/est.password_file are not set"
                )
            else:
                message = f"{what}: HTTP 401: authentication required ({challenge})"
            raise EnrollmentError(message + detail, status=status)
        if 400 <= status < 500:
            raise EnrollmentError(
                f"{what}: the server refused the request: HTTP {status} {response.reason}" + detail,
                status=status,
            )
        if status >= 500:
            raise TransportError(
                f"{what}: server error HTTP {status} {response.reason}" + detail,
                status=status,
                retry_after=wire.delta_seconds(response.header("retry-after")),
            )
        if 300 <= status < 400:
            location = _printable(response.header("location") or "no Location")
            raise EnrollmentError(
                f"{what}: HTTP {status} {response.reason} redirect to {location}; EST "
                "redirects are not followed (point est.url at the server itself)",
                status=status,
            )
        raise EnrollmentError(f"{what}: unexpected HTTP {status} {response.reason}", status=status)


#: what a refusal's status text, body or WWW-Authenticate says when it is not about credentials
_CAUSES = (
    (
        re.compile(r"proof[\s_-]*of[\s_-]*possession|\bpop\b|tls[\s_-]*unique", re.I),
        "the server refused the proof-of-possession (the CSR's challengePassword must carry this "
        "TLS connection's tls-unique: est.proof_of_possession 'always' makes sure it does; a "
        "TLS-terminating proxy in between breaks it)",
    ),
    (
        re.compile(r"csr[\s_-]*attr|attribute|\bcsrattrs\b", re.I),
        "the server refused an attribute of the CSR (see what /csrattrs asks for, and the "
        "[subject] settings)",
    ),
    (
        re.compile(r"\bpolic(y|ies)\b|\bprofile\b", re.I),
        "the server's policy refused the request (the credentials were not the problem)",
    ),
)


def refusal_cause(response: HttpResponse) -> str | None:
    """What a 4xx is about when its status text, body or WWW-Authenticate names a cause other
    than credentials: proof-of-possession, a CSR attribute, a policy (None: it names none)."""
    text = " ".join(
        (response.reason, response.header("www-authenticate") or "",
         response.body[:ERROR_BODY_BYTES].decode("utf-8", "replace"))
    )  # fmt: skip
    for pattern, cause in _CAUSES:
        if pattern.search(text):
            return cause
    return None


class _StaleConnection(TransportError):
    """A request on a reused kept-alive connection failed before any answer."""


def _reusable(conn: Connection) -> bool:
    return bool(getattr(conn, "reusable", False))


def _accept(media_type: str) -> dict[str, str]:
    return {"Accept": media_type}


def _basic_challenge(response: HttpResponse) -> bool:
    challenge = response.header("www-authenticate") or ""
    return "basic" in challenge.lower()


def _snippet(body: bytes) -> str:
    text = _printable(body[:200].decode("utf-8", "replace"))
    return f" ({text})" if text else ""


def _printable(text: str) -> str:
    """Server text fit for our one-line messages (a folded header or a body has line breaks)."""
    return "".join(ch if ch.isprintable() else " " for ch in text[:200]).strip()
