"""EST message bodies and headers, as RFC 7030 / RFC 8951 / RFC 2045 say and servers do (pure).

Bodies are base64 (Content-Transfer-Encoding: base64, lines of at most 76 characters). Servers
vary: some send binary DER, some leave out `smime-type`, some send trailing bytes. Be liberal in
what is accepted, strict in what is sent.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import logging
import re
from collections.abc import Mapping
from datetime import datetime, timezone

from agent.errors import EnrollmentError

log = logging.getLogger(__name__)

PKCS10 = "application/pkcs10"
PKCS7_MIME = "application/pkcs7-mime"
CSRATTRS = "application/csrattrs"

#: media types accepted for certs-only PKCS#7 (the x- form is pre-RFC 5751 and still seen)
PKCS7_TYPES = frozenset(
    {PKCS7_MIME, "application/x-pkcs7-mime", "application/x-pkcs7-certificates"}
)
#: some servers label everything octet-stream; the body parser decides then
TOLERATED_TYPES = frozenset({"application/octet-stream", ""})

_BASE64_LINE = 64
#: what may follow a base64 body and is dropped: NUL and ASCII whitespace
_TRAILING = b"\x00 \t\r\n\x0b\x0c"
#: delta-seconds (RFC 9110 10.2.3): ASCII digits only; str.isdigit() also takes "²",
#: which int() then refuses
_DELTA_SECONDS = re.compile(r"[0-9]+")
#: delta-seconds saturate here (about 31700 years): finite, so a caller's timedelta cannot
#: overflow, and far beyond any clamp bound; no need to convert thousands of digits
DELTA_SECONDS_MAX = 1e12


def encode_body(der: bytes) -> bytes:
    """base64 in lines of 64 characters with CRLF, as RFC 2045 writes it."""
    text = base64.b64encode(der)
    lines = [text[i : i + _BASE64_LINE] for i in range(0, len(text), _BASE64_LINE)]
    return b"\r\n".join(lines) + b"\r\n"


def media_type(headers: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """The Content-Type's media type (lower case) and its parameters."""
    value = headers.get("content-type", "")
    kind, _, rest = value.partition(";")
    params = {}
    for item in rest.split(";"):
        name, sep, param = item.partition("=")
        if sep:
            params[name.strip().lower()] = param.strip().strip('"').lower()
    return kind.strip().lower(), params


def check_media_type(headers: Mapping[str, str], accepted: frozenset[str], what: str) -> None:
    """Refuse a body whose Content-Type says it is something else (an HTML error page...)."""
    kind, _params = media_type(headers)
    if kind in accepted:
        return
    if kind in TOLERATED_TYPES:
        log.info("%s came as %r; parsing it anyway", what, kind or "no Content-Type")
        return
    raise EnrollmentError(
        f"{what}: unexpected Content-Type {kind!r} (expected {' or '.join(sorted(accepted))})"
    )


def decode_body(body: bytes, headers: Mapping[str, str], what: str) -> bytes:
    """The DER inside an EST body: base64 (whitespace and line breaks allowed) or, from servers
    that ignore RFC 7030 and say `Content-Transfer-Encoding: binary`, raw DER."""
    encoding = headers.get("content-transfer-encoding", "").strip().lower()
    if encoding == "binary" or (body[:1] == b"\x30" and not _looks_base64(body)):
        return body
    # trailing NULs (C servers counting their terminator) and whitespace after the base64
    compact = b"".join(body.rstrip(_TRAILING).split())
    try:
        der = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        raise EnrollmentError(f"{what}: body is neither base64 nor DER ({e})") from e
    if not der:
        raise EnrollmentError(f"{what}: empty body")
    return der


def _looks_base64(body: bytes) -> bool:
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n\t "
    return all(byte in alphabet for byte in body[:256])


def delta_seconds(value: str | None) -> float | None:
    """A header's delta-seconds value, or None when it is not one (at most DELTA_SECONDS_MAX)."""
    text = (value or "").strip()
    if not _DELTA_SECONDS.fullmatch(text):
        return None
    digits = text.lstrip("0") or "0"
    return DELTA_SECONDS_MAX if len(digits) > 12 else min(float(digits), DELTA_SECONDS_MAX)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Retry-After as seconds from `now`: delta-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if value is None or not value.strip():
        return None
    seconds = delta_seconds(value)
    if seconds is not None:
        return seconds
    text = value.strip()
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, OverflowError):
        log.warning("ignoring unparseable Retry-After %r", text[:40])
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - now).total_seconds())


def clamp_retry_after(
    seconds: float | None, *, minimum: float, maximum: float, default: float
) -> float:
    """The server's wait, bounded so a server can neither make us hammer it nor park us forever."""
    wait = default if seconds is None else seconds
    return min(max(wait, minimum), maximum)
