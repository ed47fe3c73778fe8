"""EST bodies, media types and Retry-After: pure, fast, with the variations real servers send."""

from __future__ import annotations

import base64
import contextlib
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import EnrollmentError
from agent.est import wire

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
DER = bytes.fromhex("3003020101") * 40


def test_encode_body_is_rfc2045_base64_lines() -> None:
    body = wire.encode_body(DER)
    lines = body.split(b"\r\n")
    assert all(len(line) <= 76 for line in lines)
    assert wire.decode_body(body, {}, "x") == DER


@pytest.mark.parametrize(
    "body",
    [
        base64.b64encode(DER),  # one line
        base64.encodebytes(DER),  # 76-column LF lines
        base64.encodebytes(DER).replace(b"\n", b"\r\n"),  # CRLF
        b"  " + base64.encodebytes(DER) + b"\r\n\r\n",  # stray whitespace
    ],
)
def test_decode_body_accepts_base64_variants(body: bytes) -> None:
    assert wire.decode_body(body, {"content-transfer-encoding": "base64"}, "x") == DER


def test_decode_body_accepts_binary_der() -> None:
    assert wire.decode_body(DER, {"content-transfer-encoding": "binary"}, "x") == DER
    assert wire.decode_body(DER, {}, "x") == DER  # raw DER without the header


@pytest.mark.parametrize("body", [b"\x00\xffnot base64", b"!!!!", b"", b"   "])
def test_decode_body_refuses_garbage(body: bytes) -> None:
    with pytest.raises(EnrollmentError, match="/cacerts"):
        wire.decode_body(body, {}, "/cacerts")


@given(st.binary(max_size=300))
def test_decode_body_never_raises_anything_else(body: bytes) -> None:
    with contextlib.suppress(EnrollmentError):
        wire.decode_body(body, {}, "x")


@pytest.mark.parametrize(
    "content_type",
    [
        "application/pkcs7-mime",  # /cacerts without smime-type
        "application/pkcs7-mime; smime-type=certs-only",
        'Application/PKCS7-MIME; smime-type="certs-only"',
        "application/x-pkcs7-mime",
        "application/octet-stream",  # tolerated
        "",
    ],
)
def test_media_types_accepted(content_type: str) -> None:
    wire.check_media_type({"content-type": content_type}, wire.PKCS7_TYPES, "x")


def test_media_type_html_refused() -> None:
    with pytest.raises(EnrollmentError, match="unexpected Content-Type 'text/html'"):
        wire.check_media_type({"content-type": "text/html"}, wire.PKCS7_TYPES, "x")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 5 ", 5.0),
        ("Mon, 23 Nov 2026 12:01:00 GMT", 60.0),
        ("Mon, 23 Nov 2026 11:00:00 GMT", 0.0),  # in the past
        ("soon", None),
        ("", None),
        (None, None),
        ("-5", None),
        ("1.5", None),
        ("007", 7.0),
        ("²", None),  # str.isdigit() says yes, int() says no
        ("9" * 400, wire.DELTA_SECONDS_MAX),  # int() fine, float() overflows
        ("9" * 5000, wire.DELTA_SECONDS_MAX),  # beyond int()'s 4300-digit limit
        ("Mon, 23 Nov 99999 12:00:00 GMT", None),  # a year datetime cannot hold
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert wire.parse_retry_after(value, NOW) == expected


@given(st.text(max_size=60))
def test_parse_retry_after_never_raises(value: str) -> None:
    seconds = wire.parse_retry_after(value, NOW)
    assert seconds is None or 0 <= seconds <= wire.DELTA_SECONDS_MAX  # year 9999 is 2.5e11 s
    bounded = wire.clamp_retry_after(seconds, minimum=10, maximum=86400, default=300)
    NOW + timedelta(seconds=bounded)  # a clamped wait always makes a datetime


def test_clamp_retry_after() -> None:
    bounds = {"minimum": 10.0, "maximum": 3600.0, "default": 300.0}
    assert wire.clamp_retry_after(0, **bounds) == 10.0  # no hammering
    assert wire.clamp_retry_after(10**9, **bounds) == 3600.0  # no parking forever
    assert wire.clamp_retry_after(None, **bounds) == 300.0
    assert wire.clamp_retry_after(60, **bounds) == 60.0
    assert wire.clamp_retry_after(wire.DELTA_SECONDS_MAX, **bounds) == 3600.0
