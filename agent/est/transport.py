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
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from agent import __version__
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


@dataclass(frozen=True)
class HttpsTransport:
    """EST over HTTPS to `url` ("https://host[:port][/prefix]"), trusting only `ca_file`."""

    url: str
    ca_file: Path | None
    min_tls_version: str = "1.2"
    connect_timeout_seconds: float = 10.0
    read_timeout_seconds: float = 30.0
    max_response_bytes: int = 1024 * 1024
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
        started = time.monotonic()
        try:
            raw = socket.create_connection((self.host, self.port), self.connect_timeout_seconds)
        except OSError as e:
            raise TransportError(f"cannot connect to EST server {where}: {_reason(e)}") from e
        except UnicodeError as e:  # the IDNA codec refused the host name
            raise ConfigError(f"est.url: {self.host!r} is not a valid host name ({e})") from e
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = ctx.wrap_socket(raw, server_hostname=self.host)
        except ssl.SSLCertVerificationError as e:
            raw.close()
            raise ChainValidationError(
                f"EST server {where} is not trusted by {self.ca_file}: {e.verify_message}"
            ) from _without_frames(e)
        except (OSError, ssl.SSLError) as e:
            raw.close()
            raise TransportError(
                f"TLS handshake with {where} failed: {_reason(e)}"
            ) from _without_frames(e)
        finally:
            del ctx  # see _without_frames
        handshake = time.monotonic() - started
        tls.settimeout(self.read_timeout_seconds)
        connection = _HttpsConnection(
            tls,
            host=self.host,
            port=self.port,
            provisional=provisional,
            handshake_seconds=handshake,
            read_timeout_seconds=self.read_timeout_seconds,
            max_response_bytes=self.max_response_bytes,
        )
        log.debug("connected to %s with %s in %.1f ms", where, tls.version(), handshake * 1e3)
        try:
            yield connection
        finally:
            connection.close()
            del tls  # see _without_frames


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
    ) -> None:
        self._tls = tls
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
        """One request and its whole response within read_timeout_seconds.

        The socket timeout only bounds each recv: a server (or a man in the middle of a
        bootstrap) dripping a byte now and then would keep http.client reading headers or body
        forever, holding the enrollment lock. A watchdog shuts the socket down at the deadline,
        which ends any blocked read.
        """
        if self.provisional and any(k.lower() == "authorization" for k in headers):
            raise AssertionError("credentials must not go over a provisional connection")
        what = f"{method} https://{self._where}{path}"
        if self._http.sock is None:  # closed by the server after the last response
            raise TransportError(f"{what}: the server closed this connection before")
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            with contextlib.suppress(OSError):  # the plain socket's shutdown: no TLS state
                socket.socket.shutdown(self._tls, socket.SHUT_RDWR)

        watchdog = threading.Timer(self._read_timeout, expire)
        watchdog.daemon = True
        watchdog.start()
        timed_out = f"{what}: no complete response within {self._read_timeout:g} s"
        self.reusable = False  # until this round trip has ended cleanly
        try:
            response = self._round_trip(method, path, headers, body, what)
        except AgentError as e:
            if expired.is_set():
                raise TransportError(timed_out) from e
            raise
        finally:
            watchdog.cancel()
        if expired.is_set():  # a shutdown can also pass for the end of the headers or the body
            raise TransportError(timed_out)
        self.reusable = self._kept_alive
        return response

    def _round_trip(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes | None, what: str
    ) -> HttpResponse:
        started = time.monotonic()
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
                f"{what}: no complete response within {self._read_timeout:g} s"
            ) from e
        except http.client.IncompleteRead as e:
            raise TransportError(
                f"{what}: connection closed after {len(e.partial)} bytes of the body"
            ) from e
        except (http.client.RemoteDisconnected, ConnectionError) as e:
            raise TransportError(f"{what}: server closed the connection ({_reason(e)})") from e
        except http.client.HTTPException as e:
            raise EnrollmentError(f"{what}: malformed HTTP response: {e!r}") from e
        except (OSError, ssl.SSLError) as e:
            raise TransportError(f"{what}: {_reason(e)}") from e
        elapsed = time.monotonic() - started
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
            raise TransportError(f"{what}: connection closed after {size} of {expected} bytes")
        return b"".join(chunks)[:limit]
