"""Validation of what an EST server issued: pure checks over certificates and `now`."""

from __future__ import annotations

import contextlib
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given
from hypothesis import strategies as st
from pyasn1.codec.der import encoder as der_encoder

from agent.errors import ChainValidationError, EnrollmentError, TrustError
from agent.est.response import (
    fingerprint,
    parse_certs_only,
    select_bootstrap_anchor,
    validate_ca_certs,
    validate_issued,
)
from tests.support.ca import TestCA, utcnow
from tests.support.est_server import rfc5280_decode

SKEW = dt.timedelta(minutes=5)


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def check(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, ca: TestCA, **kw: object):  # type: ignore[no-untyped-def]
    now = kw.pop("now", utcnow())
    return validate_issued(
        [cert], requested_key=key.public_key(), ca_certs=[ca.cert], now=now, clock_skew=SKEW
    )


def test_good_certificate_passes_with_chain(
    test_ca: TestCA, key: ec.EllipticCurvePrivateKey
) -> None:
    cert = test_ca.issue(key.public_key(), subject="gw-1", eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    issued = check(cert, key, test_ca)
    assert issued.certificate == cert
    assert issued.chain == (test_ca.cert,)


def test_certificate_without_eku_or_san_passes(
    test_ca: TestCA, key: ec.EllipticCurvePrivateKey
) -> None:
    check(test_ca.issue(key.public_key(), subject="gw-1"), key, test_ca)


def test_certificate_for_another_key(test_ca: TestCA, key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    cert = test_ca.issue(other.public_key(), subject="gw-1")
    with pytest.raises(TrustError, match="another key"):
        check(cert, key, test_ca)


def test_wrong_issuer(test_ca: TestCA, key: ec.EllipticCurvePrivateKey) -> None:
    cert = TestCA(name="rogue").issue(key.public_key(), subject="gw-1")
    with pytest.raises(ChainValidationError, match="does not chain"):
        check(cert, key, test_ca)


def test_expired(test_ca: TestCA, key: ec.EllipticCurvePrivateKey) -> None:
    start = utcnow() - dt.timedelta(days=3)
    cert = test_ca.issue(
        key.public_key(), subject="gw-1", not_before=start, lifetime=dt.timedelta(days=1)
    )
    with pytest.raises(ChainValidationError, match="expired"):
        check(cert, key, test_ca)


def test_not_yet_valid_within_skew_passes(test_ca: TestCA, key: ec.EllipticCurvePrivateKey) -> None:
    cert = test_ca.issue(
        key.public_key(), subject="gw-1", not_before=utcnow() + dt.timedelta(minutes=2)
    )
    check(cert, key, test_ca)
    with pytest.raises(ChainValidationError, match="not valid before"):
        check(cert, key, test_ca, now=utcnow() - dt.timedelta(minutes=10))


def test_ca_certificate_refused(test_ca: TestCA, key: ec.EllipticCurvePrivateKey) -> None:
    cert = test_ca.issue(key.public_key(), subject="gw-1", ca=True)
    with pytest.raises(EnrollmentError, match="CA certificate"):
        check(cert, key, test_ca)


def test_server_only_eku_refused(test_ca: TestCA, key: ec.EllipticCurvePrivateKey) -> None:
    cert = test_ca.issue(key.public_key(), subject="gw-1", eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(EnrollmentError, match="clientAuth"):
        check(cert, key, test_ca)


def test_parse_certs_only(test_ca: TestCA) -> None:
    der = pkcs7.serialize_certificates([test_ca.cert], serialization.Encoding.DER)
    assert parse_certs_only(der, "x") == [test_ca.cert]
    with pytest.raises(EnrollmentError, match="not a PKCS#7"):
        parse_certs_only(b"\x30\x03\x02\x01\x01", "x")


def test_bootstrap_anchor_selected_by_fingerprint(test_ca: TestCA) -> None:
    other = TestCA(name="other")
    fp = fingerprint(test_ca.cert)
    colons = ":".join(fp[i : i + 2] for i in range(0, 64, 2)).upper()
    assert select_bootstrap_anchor([other.cert, test_ca.cert], colons) == test_ca.cert
    with pytest.raises(ChainValidationError, match="fingerprint"):
        select_bootstrap_anchor([other.cert], fp)


def test_expired_ca_certs_are_dropped(test_ca: TestCA) -> None:
    now = utcnow()
    assert validate_ca_certs([test_ca.cert], now=now, clock_skew=SKEW) == [test_ca.cert]
    with pytest.raises(EnrollmentError, match="valid now"):
        validate_ca_certs([test_ca.cert], now=now + dt.timedelta(days=4000), clock_skew=SKEW)


@given(st.binary(max_size=300))
def test_any_bytes_are_certs_or_an_enrollment_error(der: bytes) -> None:
    with contextlib.suppress(EnrollmentError):
        parse_certs_only(der, "x")


def test_malformed_extensions_are_an_enrollment_error(
    test_ca: TestCA, key: ec.EllipticCurvePrivateKey
) -> None:
    decoded = rfc5280_decode(test_ca.issue(key.public_key(), subject="gw-1"))
    extensions = decoded["tbsCertificate"]["extensions"]
    extensions.append(extensions[0])  # cryptography raises DuplicateExtension, not a ValueError
    cert = x509.load_der_x509_certificate(der_encoder.encode(decoded))
    with pytest.raises(EnrollmentError, match="malformed extensions: Duplicate"):
        check(cert, key, test_ca)


def test_no_digital_signature_refused(test_ca: TestCA, key: ec.EllipticCurvePrivateKey) -> None:
    usage = x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=True,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    now = utcnow()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(test_ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(usage, critical=True)
        .sign(test_ca.key, hashes.SHA256())
    )
    with pytest.raises(EnrollmentError, match="digitalSignature"):
        check(cert, key, test_ca)


def test_bootstrap_fingerprint_of_a_non_ca_certificate_is_refused(
    test_ca: TestCA, key: ec.EllipticCurvePrivateKey
) -> None:
    leaf = test_ca.issue(key.public_key(), subject="est.example")
    with pytest.raises(ChainValidationError, match="is not a CA certificate"):
        select_bootstrap_anchor([test_ca.cert, leaf], fingerprint(leaf))
