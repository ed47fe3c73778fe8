"""Downloads for firmware: a bundle streamed from HTTPS (`install|verify https://...`) and CRLs
(`crl refresh`), with `requests`. The I/O edge only: what is downloaded is judged elsewhere
(the bundle by the same streaming verifier as a file or a pipe, a CRL by agent.firmware.crl).

A bundle is never copied to disk: `open_bundle_url` yields a read-only, unseekable stream over
the response body (`stream=True`, read in the caller's buffer), so the verifier reads the
header, checks the signatures, and only then reads the payload into the slot while hashing it,
never more than the manifest's size plus one byte (to see the end); a reader thread decrypts
at most `_Prefetch.BUFFERS` chunks ahead. Bounds: a connect timeout,
a read timeout on every wait for bytes, at most `MAX_REDIRECTS` redirects and each to https://
only, an identity encoding (no decompression), no proxy or .netrc from the environment. TLS is
verified against `firmware.download_ca`; "system" (the system store) is allowed when configured
and warned on each use. URLs in messages lose their query (a pre-signed URL's token stays out).
Imported only by the commands that download: `firmware status` and `commit` never load requests.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import urljoin, urlsplit

from agent import __version__
from agent.errors import ChainValidationError, ConfigError, TransportError

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
USER_AGENT = f"devid-agent/{__version__}"

#: what the install path is given: a URL in, a stream of the bundle's bytes out
BundleOpener = Callable[[str], contextlib.AbstractContextManager[BinaryIO]]
#: a URL in, its whole body (at most `limit` bytes) out
Fetcher = Callable[[str, int], bytes]


@dataclass(frozen=True)
class DownloadSettings:
    #: a PEM file of the CA(s) the server must chain to, or "system"
    ca: str
    connect_timeout_seconds: float = 10.0
    read_timeout_seconds: float = 30.0
    #: which config key named `ca`, for messages
    ca_key: str = "firmware.download_ca"


def shown(url: str) -> str:
    """`url` for messages: scheme, host, port and path; no query, fragment or user info."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _chain_of(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException] = [e]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        todo += [a for a in getattr(cur, "args", ()) if isinstance(a, BaseException)]
        for attr in ("reason", "__cause__", "__context__"):
            nxt = getattr(cur, attr, None)
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def _length(response: requests.Response) -> int | None:
    text = response.headers.get("content-length", "").strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def _reason(e: BaseException) -> str:
    import ssl

    for cur in _chain_of(e):
        if isinstance(cur, ssl.SSLCertVerificationError):
            return cur.verify_message or str(cur)
    for cur in _chain_of(e):
        if isinstance(cur, TimeoutError) or "timed out" in str(cur).lower():
            return "timed out"
    for cur in _chain_of(e):
        if isinstance(cur, ssl.SSLError):
            return cur.reason or str(cur)
    for cur in _chain_of(e):
        if isinstance(cur, OSError) and cur.strerror:
            return cur.strerror
    return str(e) or type(e).__name__


def _cert_rejected(e: BaseException) -> bool:
    import ssl

    return any(isinstance(cur, ssl.SSLCertVerificationError) for cur in _chain_of(e))


class _Session:
    """A requests session with nothing taken from the environment (proxies, .netrc, CA
    bundle variables), TLS verified against the configured CA."""

    def __init__(self, settings: DownloadSettings) -> None:
        import requests

        self.settings = settings
        #: None: no CA configured, so only plain http:// (a signed CRL) can be fetched
        self.verify: bool | str | None = True if settings.ca == "system" else settings.ca or None
        self.session = requests.Session()
        self.session.trust_env = False

    def _verify_for(self, url: str, what: str) -> bool | str:
        if urlsplit(url).scheme != "https":
            return True  # no TLS on this request
        if self.verify is None:
            raise ConfigError(
                f"{what} {shown(url)}: {self.settings.ca_key} is not set, so HTTPS downloads "
                "are off (name the PEM file of the CA that authenticates the server)"
            )
        if self.verify is True:
            log.warning(
                '%s = "system": any CA in the system store may serve %s (its signature still '
                "decides what is used)",
                self.settings.ca_key,
                shown(url),
            )
        return self.verify

    def close(self) -> None:
        self.session.close()

    def get(self, url: str, what: str) -> requests.Response:
        """GET `url` (streamed), following redirects to https:// only; a 200 response."""
        import requests

        current = url
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(current)
            if parts.scheme not in ("https", "http") or not parts.hostname:
                raise ConfigError(f"{what} {shown(current)}: not an https:// URL")
            verify = self._verify_for(current, what)
            try:
                response = self.session.get(
                    current,
                    stream=True,
                    allow_redirects=False,
                    verify=verify,
                    timeout=(
                        self.settings.connect_timeout_seconds,
                        self.settings.read_timeout_seconds,
                    ),
                    headers={"Accept-Encoding": "identity", "User-Agent": USER_AGENT},
                )
            except requests.exceptions.SSLError as e:
                if _cert_rejected(e):
                    raise ChainValidationError(
                        f"{what} {shown(current)}: the server is not trusted by "
                        f"{self.settings.ca_key} ({_reason(e)})"
                    ) from e
                raise TransportError(f"{what} {shown(current)}: TLS failed: {_reason(e)}") from e
            except requests.exceptions.RequestException as e:
                raise TransportError(f"{what} {shown(current)}: {_reason(e)}") from e
            if response.is_redirect:
                location = response.headers.get("location", "")
                response.close()
                target = urljoin(current, location)
                if urlsplit(target).scheme != "https":
                    raise TransportError(
                        f"{what} {shown(current)} redirects to {shown(target)}: refused (only "
                        "redirects to https:// are followed)"
                    )
                current = target
                continue
            if response.status_code != 200:
                status, reason = response.status_code, response.reason
                response.close()
                raise TransportError(
                    f"{what} {shown(current)}: the server answered {status} {reason}",
                    status=status,
                )
            return response
        raise TransportError(f"{what} {shown(url)}: more than {MAX_REDIRECTS} redirects")


class _Prefetch:
    """Reads ahead in a thread, so that TLS decryption of the next chunk overlaps the hashing
    and slot writing of this one (both release the GIL). Memory stays bounded: at most
    `BUFFERS` chunks are filled ahead; the reader waits for a free one."""

    CHUNK = 512 * 1024
    BUFFERS = 4

    def __init__(self, source: Callable[[Any], int]) -> None:
        import queue
        import threading

        self._source = source
        self._filled: queue.SimpleQueue[tuple[bytearray, int, BaseException | None]] = (
            queue.SimpleQueue()
        )
        self._free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        for _ in range(self.BUFFERS):
            self._free.put(bytearray(self.CHUNK))
        self._current: bytearray | None = None
        self._pos = self._end = 0
        self._done = False
        self._thread = threading.Thread(target=self._run, name="bundle-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (buf := self._free.get()) is not None:
            try:
                n = self._source(memoryview(buf)) or 0
            except BaseException as e:  # handed to the reader, which raises it
                self._filled.put((buf, 0, e))
                return
            self._filled.put((buf, n, None))
            if not n:
                return

    def readinto(self, buffer: Any) -> int:
        if self._current is None:
            if self._done:
                return 0
            buf, n, error = self._filled.get()
            if error is not None:
                self._done = True
                raise error
            if not n:
                self._done = True
                return 0
            self._current, self._pos, self._end = buf, 0, n
        take = min(len(buffer), self._end - self._pos)
        buffer[:take] = memoryview(self._current)[self._pos : self._pos + take]
        self._pos += take
        if self._pos == self._end:
            self._free.put(self._current)
            self._current = None
        return take

    def stop(self) -> None:
        self._done = True
        self._free.put(None)  # the reader ends at its next free-buffer wait


class _BodyStream(io.RawIOBase):
    """The response body as an unseekable binary stream; network failures while reading become
    one-line TransportErrors (a download cut short is retryable; a short bundle is not)."""

    def __init__(
        self,
        raw: Any,
        where: str,
        what: str = "bundle download",
        after: str = "",
        length: int | None = None,
        prefetch: bool = False,
    ) -> None:
        super().__init__()
        #: the body's Content-Length, when the server sent one
        self._length = length
        self._raw = raw
        self._where = where
        self._what = what
        self._after = after
        self.received = 0
        # urllib3's response wraps http.client's, which reads straight into the caller's
        # buffer (no copy) and still checks Content-Length (IncompleteRead when cut short);
        # with decode_content off (requests' stream) urllib3 adds nothing we need on the way.
        fp: Any = getattr(raw, "_fp", None)
        self._readinto = fp.readinto if hasattr(fp, "readinto") else self._copy_into
        self._prefetch = _Prefetch(self._readinto) if prefetch else None
        if self._prefetch is not None:
            self._readinto = self._prefetch.readinto

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.stop()
        super().close()

    @property
    def declared_remaining(self) -> int | None:
        """Bytes the server still announces (Content-Length less what was read), or None: the
        device compares it with the manifest's payload size before it touches a slot."""
        return None if self._length is None else self._length - self.received

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buffer: Any) -> int:
        try:
            n: int = self._readinto(buffer) or 0
        except Exception as e:  # urllib3's ReadTimeoutError, ProtocolError, SSL and OS errors
            what = "no data within the read timeout" if _reason(e) == "timed out" else _reason(e)
            raise TransportError(
                f"{self._what} {self._where} broke off after {self.received} bytes: "
                f"{what}{self._after}"
            ) from e
        if not n and len(buffer) and self._length is not None and self.received < self._length:
            raise TransportError(
                f"{self._what} {self._where} broke off after {self.received} of the "
                f"{self._length} bytes the server announced{self._after}"
            )
        self.received += n
        return n

    def _copy_into(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@contextlib.contextmanager
def open_bundle_url(url: str, settings: DownloadSettings) -> Iterator[BinaryIO]:
    """Stream the bundle at `url` (https://); closed when the block ends."""
    if urlsplit(url).scheme != "https":
        raise ConfigError(f"bundle {shown(url)}: only https:// URLs are downloaded")
    session = _Session(settings)
    try:
        response = session.get(url, "bundle download")
        try:
            body = _BodyStream(
                response.raw,
                shown(url),
                after="; the booted slot is untouched",
                length=_length(response),
                prefetch=True,
            )
            try:
                yield cast(BinaryIO, body)
            finally:
                body.close()
        finally:
            response.close()
    finally:
        session.close()


def bundle_opener(settings: DownloadSettings) -> BundleOpener:
    return lambda url: open_bundle_url(url, settings)


def fetch_bytes(url: str, limit: int, settings: DownloadSettings) -> bytes:
    """The whole body at `url` (http:// or https://; redirects to https:// only), at most
    `limit` bytes: for CRLs, which are signed, so plain HTTP is allowed (RFC 5280 4.2.1.13)."""
    session = _Session(settings)
    try:
        response = session.get(url, "CRL download")
        try:
            body = _BodyStream(
                response.raw, shown(url), what="CRL download", length=_length(response)
            )
            out = bytearray()
            buf = bytearray(64 * 1024)
            while len(out) <= limit:
                n = body.readinto(memoryview(buf)[: min(len(buf), limit + 1 - len(out))])
                if not n:
                    break
                out += buf[:n]
            if len(out) > limit:
                raise TransportError(f"CRL download {shown(url)}: more than {limit} bytes")
            return bytes(out)
        finally:
            response.close()
    finally:
        session.close()
