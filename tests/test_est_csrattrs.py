"""/csrattrs parsing (pyasn1-modules CsrAttrs) and what the agent makes of it."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import EnrollmentError
from agent.est.csrattrs import (
    MAX_ITEMS,
    MAX_REPORTED,
    MAX_REPORTED_CHARS,
    CsrAttrsHints,
    parse_csrattrs,
    plan_csr,
)
from agent.est.wire import decode_body
from agent.pki import SubjectSpec
from hal.interfaces import KeyAlgorithm
from tests.support.est_server import b64_lines, csrattrs_der

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


# -- bounded (issue 14.5) and liberal (issue 8.5) --------------------------------------------------


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = (n.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + n.to_bytes(size, "big") + content


def _oid(arcs: list[int]) -> bytes:
    body = bytes([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return _tlv(0x06, body)


RSA = [1, 2, 840, 113549, 1, 1, 1]


def test_a_2000_byte_rsa_size_is_ignored_not_an_error() -> None:
    huge = _tlv(0x02, b"\x7f" + b"\xff" * 1999)  # a 16000-bit positive INTEGER
    attribute = _tlv(0x30, _oid(RSA) + _tlv(0x31, huge))
    hints = parse_csrattrs(_tlv(0x30, attribute))
    assert hints.key_type == "rsa" and hints.key_algorithm is None
    assert hints.ignored == ("rsaEncryption size (not a small INTEGER, 2004 B) (not supported)",)
    assert plan_csr(hints, KeyAlgorithm.EC_P256, SUBJECT).algorithm is KeyAlgorithm.RSA_2048


def test_a_megabyte_of_oids_is_bounded() -> None:
    oids = b"".join(_oid([1, 3, 6, 1, 4, 1, 99999, n]) for n in range(95_000))
    der = _tlv(0x30, oids)
    assert len(der) > 1_000_000
    hints = parse_csrattrs(der)
    assert len(hints.ignored) == MAX_REPORTED + 1  # the first few, then a count
    assert hints.ignored[:2] == ("1.3.6.1.4.1.99999.0", "1.3.6.1.4.1.99999.1")
    # items after MAX_ITEMS are not even decoded: 64 items seen, 16 reported, the rest counted
    assert hints.ignored[-1] == f"{MAX_ITEMS - MAX_REPORTED + 1} more"
    assert all(len(item) <= MAX_REPORTED_CHARS for item in hints.ignored)


def test_an_oversized_item_and_long_oids_are_clipped() -> None:
    long_oid = _oid([1, 3, *range(1, 400)])
    values = _tlv(0x31, b"".join(_oid([1, 2, n]) for n in range(20)))
    attribute = _tlv(0x30, _oid([1, 2, 3]) + values)
    big = _tlv(0x30, _oid([1, 2, 4]) + _tlv(0x31, _tlv(0x04, b"x" * 5000)))
    hints = parse_csrattrs(_tlv(0x30, long_oid + attribute + big))
    assert len(hints.ignored[0]) == MAX_REPORTED_CHARS and hints.ignored[0].endswith("...")
    assert "12 values of 1.2.3 beyond the first" in hints.ignored
    assert "attribute 1.2.3" in hints.ignored
    assert any(item.startswith("an item of 50") for item in hints.ignored)


def test_any_failure_while_parsing_is_unusable_csrattrs(monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.est.csrattrs as module

    def explode(*args: object, **kwargs: object) -> object:
        raise RecursionError("deep")

    monkeypatch.setattr(module.der_decoder, "decode", explode)
    with pytest.raises(EnrollmentError, match=r"^/csrattrs: unusable \(RecursionError\)$"):
        parse_csrattrs(csrattrs_der())


def test_bare_curve_oid_is_understood() -> None:
    hints = parse_csrattrs(csrattrs_der(curve=None, oids=("secp384r1", "1.2.3.4")))
    assert (hints.key_type, hints.key_algorithm) == ("ec", KeyAlgorithm.EC_P384)
    assert hints.ignored == ("1.2.3.4",)


@pytest.mark.parametrize("suffix", [b"\x00", b"\x00\x00\r\n", b"\r\n \t", b" \x00\n\x00"])
def test_trailing_nul_and_whitespace_after_base64_are_parsed(suffix: bytes) -> None:
    body = b64_lines(csrattrs_der(curve="secp384r1")) + suffix
    der = decode_body(body, {"content-transfer-encoding": "base64"}, "/csrattrs")
    assert parse_csrattrs(der).key_algorithm is KeyAlgorithm.EC_P384
