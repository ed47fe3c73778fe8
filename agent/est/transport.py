"""HTTPS for EST over a TLS socket the agent controls (http.client on an ssl.SSLSocket).

Why not `requests`: proof-of-possession needs the `tls-unique` of the very connection that
carries the enrollment request, and the CSR must be signed after that handshake and before the
request is sent. urllib3 pools and hides its sockets; here the caller holds the connection, reads
`tls_unique`, then sends. The seam is `Transport.connect()`; tests and other transports implement
the same two small Protocols.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import select
import socket
import ssl
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from agent import __version__
from agent.clock import Clock, Interrupt, SystemClock
from agent.errors import (
    AgentError,
    ChainValidationError,
    ConfigError,
    EnrollmentError,
    TransportError,
)
from agent.tls import client_context, insecure_unverified_context

log = logging.getLogger(__name__)

USER_AGENT = f"devid-agent/{__version__}"
#: how much of an error response body is read, for the message
ERROR_BODY_BYTES = 4096
_CHUNK = 16 * 1024


@dataclass(frozen=True)
class ClientIdentity:
    """A TLS client certificate and its key (a TSS2 PRIVATE KEY for the TPM, or a PEM file)."""

    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class HttpResponse:
    status: int
    reason: str
    headers: Mapping[str, str]  # names in lower case
    body: bytes
    elapsed_seconds: float = 0.0  # request sent -> response read (server time + transfer)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class Connection(Protocol):
    """One TLS connection to the EST server."""

    #: "TLSv1.2" or "TLSv1.3"
    tls_version: str
    #: the TLS 1.2 Finished-message channel binding (RFC 5929); None on TLS 1.3
    tls_unique: bytes | None
    #: True when the server certificate was NOT verified (bootstrap only): send no secrets
    provisional: bool
    handshake_seconds: float
    #: the server kept the connection open after the last response, whose body was read whole:
    #: another request may follow on it
    reusable: bool

    def request(
        self, method: str, path: str, *, headers: Mapping[str, str], body: bytes | None = None
    ) -> HttpResponse: ...


class Transport(Protocol):
    def connect(
        self,
        *,
        client_identity: ClientIdentity | None = None,
        max_tls_version: str | None = None,
        provisional: bool = False,
    ) -> contextlib.AbstractContextManager[Connection]: ...


class Interrupted(TransportError):
    """The service is stopping: a request in progress was cut short (nothing was adopted)."""


@dataclass(frozen=True)
class HttpsTransport:
    """EST over HTTPS to `url` ("https://host[:port][/prefix]"), trusting only `ca_file`.

    Deadlines, not only socket timeouts (which bound each recv, so a peer sending a byte now and
    then would never time out): the TCP connect and the TLS handshake together end within
    `connect_timeout_seconds`, each request's whole response within `read_timeout_seconds`. A
    watcher thread shuts the socket down at the deadline, or at once when `interrupt` trips
    (the service is stopping), which ends any blocked read.
    """

    url: str
    ca_file: Path | None
    min_tls_version: str = "1.2"
    connect_timeout_seconds: float = 10.0
    read_timeout_seconds: float = 30.0
    max_response_bytes: int = 1024 * 1024
    clock: Clock = field(default_factory=SystemClock)
    interrupt: Interrupt | None = None
    host: str = field(init=False)
    port: int = field(init=False)
    prefix: str = field(init=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigError(f"est.url: expected an https:// URL, got {self.url!r}")
        object.__setattr__(self, "host", parts.hostname)
        object.__setattr__(self, "port", parts.port or 443)
        object.__setattr__(self, "prefix", parts.path.rstrip("/"))

    def _context(
        self, client_identity: ClientIdentity | None, max_tls_version: str | None, provisional: bool
    ) -> ssl.SSLContext:
        if provisional:
            # RFC 7030 4.1.1 provisional TLS: used only to fetch /cacerts, whose CA certificate
            # is then accepted only if its fingerprint matches the configured one.
            return insecure_unverified_context(
                peer=self.host, min_version=self.min_tls_version, max_version=max_tls_version
            )
        if self.ca_file is None:
            raise ConfigError("est: no trust anchor for the EST server (set est.trust_anchor)")
        return client_context(
            ca_file=self.ca_file,
            cert_file=client_identity.cert_file if client_identity else None,
            key_file=client_identity.key_file if client_identity else None,
            min_version=self.min_tls_version,
            max_version=max_tls_version,
        )

    @contextlib.contextmanager
    def connect(
        self,
        *,
        client_identity: ClientIdentity | None = None,
        max_tls_version: str | None = None,
        provisional: bool = False,
    ) -> Iterator[Connection]:
        ctx = self._context(client_identity, max_tls_version, provisional)
        where = f"{self.host}:{self.port}"
        _check_interrupt(self.interrupt, f"connecting to EST server {where}")
        started = self.clock.monotonic()
        try:
            raw = socket.create_connection((self.host, self.port), self.connect_timeout_seconds)
        except OSError as e:
            raise TransportError(f"cannot connect to EST server {where}: {_reason(e)}") from e
        except UnicodeError as e:  # the IDNA codec refused the host name
            raise ConfigError(f"est.url: {self.host!r} is not a valid host name ({e})") from e
        budget = self.connect_timeout_seconds - (self.clock.monotonic() - started)
        what = f"TLS handshake with {where}"
        try:
            deadline = _Deadline(raw, budget, self.interrupt, self.clock)
        except OSError as e:  # out of descriptors
            raw.close()
            raise TransportError(f"{what} failed: {_reason(e)}") from e
        limit = f"not done within {self.connect_timeout_seconds:g} s (est.connect_timeout_seconds)"
        try:
            with deadline:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tls = ctx.wrap_socket(raw, server_hostname=self.host)
        except ssl.SSLCertVerificationError as e:
            raw.close()
            raise ChainValidationError(
                f"EST server {where} is not trusted: {_untrusted(e, self.host)}; trust anchor "
                f"{self.ca_file}"
            ) from _without_frames(e)
        except (OSError, ssl.SSLError) as e:
            raw.close()
            cut = deadline.error(what, limit)
            if cut is None and isinstance(e, TimeoutError):  # one recv waited the whole budget
                cut = TransportError(f"{what}: {limit}")
            raise cut or TransportError(
                f"{what} failed: {_handshake_reason(e, self.min_tls_version)}"
            ) from _without_frames(e)
        finally:
            del ctx  # see _without_frames
        cut = deadline.error(what, limit)
        if cut is not None:  # a shutdown can also pass for a finished handshake
            tls.close()
            del tls
            raise cut
        handshake = self.clock.monotonic() - started
        tls.settimeout(self.read_timeout_seconds)
        connection = _HttpsConnection(
            tls,
            host=self.host,
            port=self.port,
            provisional=provisional,
            handshake_seconds=handshake,
            read_timeout_seconds=self.read_timeout_seconds,
            max_response_bytes=self.max_response_bytes,
            clock=self.clock,
            interrupt=self.interrupt,
        )
        log.debug("connected to %s with %s in %.1f ms", where, tls.version(), handshake * 1e3)
        try:
            yield connection
        finally:
            connection.close()
            del tls  # see _without_frames


class _Deadline:
    """Within `with`: shut `sock` down when `seconds` have passed or `interrupt` trips, which
    ends any read blocked on it. A thread waits for the first of: the block's end (a pipe
    closed), the interrupt's pipe, the deadline (measured on `clock`)."""

    def __init__(
        self, sock: socket.socket, seconds: float, interrupt: Interrupt | None, clock: Clock
    ) -> None:
        # a duplicate of the descriptor, not `sock`: wrap_socket detaches the plain socket it
        # is given before its handshake, shutdown acts on the connection whichever descriptor,
        # and an SSLSocket kept here would keep its SSLContext (a TPM slot) alive in the frames
        # of an error (see _without_frames)
        self._shut = socket.fromfd(sock.fileno(), sock.family, sock.type)
        self._seconds = seconds
        self._interrupt = interrupt
        self._clock = clock
        self.expired = False
        self.interrupted = False
        self._done_read = self._done_write = -1
        self._thread: threading.Thread | None = None

    def error(self, what: str, limit: str) -> TransportError | None:
        """The error to raise when the watcher cut the socket (None: it did not)."""
        if self.interrupted:
            return Interrupted(f"{what}: interrupted: the service is stopping")
        if self.expired:
            return TransportError(f"{what}: {limit}")
        return None

    def __enter__(self) -> _Deadline:
        self._done_read, self._done_write = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._watch, name="est-deadline", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._done_write)  # the watcher sees the end of the pipe: done in time
        if self._thread is not None:
            self._thread.join()
        os.close(self._done_read)
        self._shut.close()

    def _watch(self) -> None:
        fds = [self._done_read]
        if self._interrupt is not None:
            fds.append(self._interrupt.fileno())
        end = self._clock.monotonic() + self._seconds
        while True:
            if self._interrupt is not None and self._interrupt.is_set():
                self.interrupted = True
                break
            left = end - self._clock.monotonic()
            if left <= 0:
                self.expired = True
                break
            ready, _, _ = select.select(fds, [], [], left)
            if self._done_read in ready:
                return
        with contextlib.suppress(OSError):  # a plain socket's shutdown: no TLS state
            self._shut.shutdown(socket.SHUT_RDWR)


def _check_interrupt(interrupt: Interrupt | None, what: str) -> None:
    if interrupt is not None and interrupt.is_set():
        raise Interrupted(f"{what}: interrupted: the service is stopping")


_OTHER_CA = "(another CA: a man in the middle, or the wrong est.trust_anchor)"
#: OpenSSL verify codes (X509_V_ERR_*) for the EST server's certificate, in words
_UNTRUSTED = {
    2: f"its certificate's issuer is not the trust anchor {_OTHER_CA}",
    18: f"its certificate is self-signed and not the trust anchor {_OTHER_CA}",
    19: f"its chain ends in a root that is not the trust anchor {_OTHER_CA}",
    20: f"its certificate does not chain to the trust anchor {_OTHER_CA}",
    21: f"its certificate does not chain to the trust anchor {_OTHER_CA}",
    9: "its certificate is not valid yet (or this device's clock is behind)",
    10: "its certificate has expired (or this device's clock is ahead)",
}


def _untrusted(e: ssl.SSLCertVerificationError, host: str) -> str:
    """Why the server's certificate was refused, in one phrase, OpenSSL's words after it."""
    code = e.verify_code
    detail = e.verify_message or _reason(e)
    if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
        return f"its certificate is for another host name, not {host!r} of est.url ({detail})"
    words = _UNTRUSTED.get(code)
    return f"{words} ({detail})" if words else detail


#: OpenSSL reasons meaning no protocol version both sides accept
_VERSION_REASONS = (
    "UNSUPPORTED_PROTOCOL",
    "TLSV1_ALERT_PROTOCOL_VERSION",
    "WRONG_SSL_VERSION",
    "NO_PROTOCOLS_AVAILABLE",
    "VERSION_TOO_LOW",
)


def _handshake_reason(e: BaseException, min_version: str) -> str:
    reason = _reason(e)
    if isinstance(e, ssl.SSLError) and (e.reason or "").upper() in _VERSION_REASONS:
        return (
            f"the server offers no TLS version >= {min_version} (tls.min_version; TLS 1.0 and "
            f"1.1 are never used) ({reason})"
        )
    return reason


def _without_frames(e: BaseException) -> BaseException:
    """`e` without its traceback, whose frames (ours and ssl's) reference the SSLContext.

    A context with a TPM client key holds one of the TPM's few object slots (swtpm has 3) until
    it is freed. An error keeps its frames alive, and with them their locals, until the cycle
    collector runs: a daemon retrying a failing renewal would run the TPM out of slots. So the
    context is never left in a frame an error can carry: `del` in our frames, no traceback from
    ssl's, and a closed connection lets go of its socket.
    """
    return e.with_traceback(None)


def _content_length(value: str | None) -> int | None:
    """Content-Length as a number, or None when absent or not ASCII digits ("²".isdigit() is
    True, and int() then raises)."""
    text = (value or "").strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def _reason(e: BaseException) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


class _HttpsConnection:
    def __init__(
        self,
        tls: ssl.SSLSocket,
        *,
        host: str,
        port: int,
        provisional: bool,
        handshake_seconds: float,
        read_timeout_seconds: float,
        max_response_bytes: int,
        clock: Clock,
        interrupt: Interrupt | None,
    ) -> None:
        self._tls = tls
        self._clock = clock
        self._interrupt = interrupt
        self._http = http.client.HTTPConnection(host, port, timeout=read_timeout_seconds)
        self._http.sock = tls  # already connected and handshaken: http.client will not connect
        self._http.auto_open = 0  # and once closed, never again (it would connect in plain TCP)
        self._where = f"{host}:{port}"
        self.tls_version = tls.version() or "?"
        self.tls_unique = (
            tls.get_channel_binding("tls-unique") if "1.2" in self.tls_version else None
        )
        self.provisional = provisional
        self.handshake_seconds = handshake_seconds
        self._read_timeout = read_timeout_seconds
        self._max_bytes = max_response_bytes
        self.reusable = True
        self._kept_alive = False

    def close(self) -> None:
        self._http.close()  # closes the TLS socket and forgets it
        del self._tls  # see _without_frames

    def request(
        self, method: str, path: str, *, headers: Mapping[str, str], body: bytes | None = None
    ) -> HttpResponse:
        """One request and its whole response within read_timeout_seconds (a deadline: the
        socket timeout only bounds each recv, and a server, or a man in the middle of a
        bootstrap, dripping a byte now and then would keep http.client reading forever, holding
        the enrollment lock), or until the interrupt trips."""
        if self.provisional and any(k.lower() == "authorization" for k in headers):
            raise AssertionError("credentials must not go over a provisional connection")
        what = f"{method} https://{self._where}{path}"
        if self._http.sock is None:  # closed by the server after the last response
            raise TransportError(f"{what}: the server closed this connection before")
        _check_interrupt(self._interrupt, what)
        deadline = _Deadline(self._tls, self._read_timeout, self._interrupt, self._clock)
        limit = f"no complete response within {self._read_timeout:g} s (est.read_timeout_seconds)"
        self.reusable = False  # until this round trip has ended cleanly
        try:
            with deadline:
                response = self._round_trip(method, path, headers, body, what)
        except AgentError as e:
            cut = deadline.error(what, limit)
            if cut is not None:
                raise cut from e
            raise
        cut = deadline.error(what, limit)
        if cut is not None:  # a shutdown can also pass for the end of the headers or the body
            raise cut
        self.reusable = self._kept_alive
        return response

    def _round_trip(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes | None, what: str
    ) -> HttpResponse:
        started = self._clock.monotonic()
        try:
            self._http.putrequest(method, path, skip_accept_encoding=True)
            for name, value in {"User-Agent": USER_AGENT, **headers}.items():
                self._http.putheader(name, value)
            if body is not None:
                self._http.putheader("Content-Length", str(len(body)))
            self._http.endheaders(body)
            response = self._http.getresponse()
            try:
                names = {k.lower(): v for k, v in response.getheaders()}
                if response.status == 200:
                    data = self._read_body(response, self._max_bytes, what, strict=True)
                elif response.status in (202, 204):
                    data = b""  # may come without Content-Length: reading would wait for a close
                else:
                    data = self._read_body(response, ERROR_BODY_BYTES, what, strict=False)
                # HTTP/1.1 keep-alive: the server did not say close, and the body was read to
                # its end (a 202 without Content-Length ends only at the close)
                self._kept_alive = not response.will_close and (
                    response.isclosed() or response.length == 0
                )
            finally:
                response.close()  # releases its file object's hold on the socket
        except TimeoutError as e:
            raise TransportError(
                f"{what}: no complete response within {self._read_timeout:g} s "
                "(est.read_timeout_seconds)"
            ) from e
        except http.client.IncompleteRead as e:
            raise TransportError(
                f"{what}: connection closed or reset after {len(e.partial)} bytes of the body"
            ) from e
        except (http.client.RemoteDisconnected, ConnectionError) as e:
            raise TransportError(f"{what}: server closed the connection ({_reason(e)})") from e
        except http.client.HTTPException as e:
            raise EnrollmentError(f"{what}: malformed HTTP response: {e!r}") from e
        except (OSError, ssl.SSLError) as e:
            raise TransportError(f"{what}: {_reason(e)}") from e
        elapsed = self._clock.monotonic() - started
        log.debug("%s -> %d in %.1f ms", what, response.status, elapsed * 1e3)
        return HttpResponse(
            status=response.status,
            reason=response.reason,
            headers=names,
            body=data,
            elapsed_seconds=elapsed,
        )

    def _read_body(
        self,
        response: http.client.HTTPResponse,
        limit: int,
        what: str,
        *,
        strict: bool,
    ) -> bytes:
        header = response.getheader("Content-Length")
        expected = _content_length(header)
        if strict and expected is not None and expected > limit:
            raise EnrollmentError(
                f"{what}: response of {expected} bytes exceeds est.max_response_bytes={limit}"
            )
        if not strict and header is None and response.getheader("Transfer-Encoding") is None:
            return b""  # an error page without length: not worth waiting for the close
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = response.read(min(_CHUNK, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                if strict:
                    raise EnrollmentError(
                        f"{what}: response exceeds est.max_response_bytes={limit} bytes"
                    )
                break
        if strict and expected is not None and size < expected:
            # http.client returns short reads silently when the peer closes early
            raise TransportError(
                f"{what}: connection closed or reset after {size} of {expected} bytes"
            )
        return b"".join(chunks)[:limit]
