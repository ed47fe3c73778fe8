"""/csrattrs parsing (pyasn1-modules CsrAttrs) and what the agent makes of it."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import EnrollmentError
from agent.est.csrattrs import CsrAttrsHints, parse_csrattrs, plan_csr
from agent.pki import SubjectSpec
from hal.interfaces import KeyAlgorithm
from tests.support.est_server import csrattrs_der

SUBJECT = SubjectSpec(common_name="gw-1")


def test_rfc7030_style_attributes_are_honoured() -> None:
    der = csrattrs_der(
        curve="secp384r1", oids=("challengePassword", "ecdsaWithSHA384", "serialNumber")
    )
    hints = parse_csrattrs(der)
    assert hints.key_algorithm is KeyAlgorithm.EC_P384
    assert hints.hash_name == "sha384"
    assert hints.pop_requested
    assert hints.ignored == ()
    plan = plan_csr(hints, KeyAlgorithm.EC_P256, SUBJECT)
    assert plan.algorithm is KeyAlgorithm.EC_P384
    assert plan.subject.serial_number == "gw-1"
    assert plan.hash_name == "sha384"


def test_trailing_garbage_is_ignored() -> None:
    hints = parse_csrattrs(csrattrs_der() + b"\x00\x00garbage")
    assert hints.key_algorithm is KeyAlgorithm.EC_P256


def test_unknown_items_are_reported_as_ignored() -> None:
    hints = parse_csrattrs(csrattrs_der(curve=None, oids=("macAddress", "1.2.3.4")))
    assert any("macAddress" in item for item in hints.ignored)
    assert "1.2.3.4" in hints.ignored
    assert plan_csr(hints, KeyAlgorithm.EC_P256, SUBJECT).algorithm is KeyAlgorithm.EC_P256


def test_ec_key_type_without_curve_moves_rsa_config_to_p256() -> None:
    hints = parse_csrattrs(csrattrs_der(curve=None, oids=("ecPublicKey",)))
    assert plan_csr(hints, KeyAlgorithm.RSA_2048, SUBJECT).algorithm is KeyAlgorithm.EC_P256


def test_empty_body_or_sequence_means_no_hints() -> None:
    assert parse_csrattrs(b"") == CsrAttrsHints()
    assert parse_csrattrs(b"\x30\x00") == CsrAttrsHints()


@pytest.mark.parametrize("der", [b"\x04\x03abc", b"\x30\x05\x02\x01", b"garbage"])
def test_not_csrattrs_is_an_enrollment_error(der: bytes) -> None:
    with pytest.raises(EnrollmentError, match="/csrattrs"):
        parse_csrattrs(der)


@given(st.binary(max_size=200))
def test_any_bytes_give_hints_or_an_enrollment_error(der: bytes) -> None:
    with contextlib.suppress(EnrollmentError):
        parse_csrattrs(der)


@given(st.binary(max_size=200))
def test_any_bytes_after_a_valid_csrattrs_are_ignored(tail: bytes) -> None:
    assert parse_csrattrs(csrattrs_der() + tail).key_algorithm is KeyAlgorithm.EC_P256
