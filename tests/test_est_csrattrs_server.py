"""/csrattrs from the test EST server, hostile and sloppy, through a whole enrollment."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent import wiring
from agent.clock import ManualClock
from agent.config import parse_config
from agent.enroll import Enroller
from hal.softkeys import SoftwareKeyStore
from tests.support.enroll_env import config_text
from tests.support.est_server import EstOptions, EstServer, csrattrs_der
from tests.test_est_csrattrs import RSA, _oid, _tlv


@pytest.fixture
def est(tmp_path: Path) -> Iterator[EstServer]:
    with EstServer(tmp_path / "est", EstOptions()) as server:
        yield server


def _enroller(tmp_path: Path, est: EstServer, **keys: object) -> Enroller:
    text = config_text(state_dir=tmp_path / "state", est=est, store="software", **keys)
    config = parse_config(text, source=tmp_path / "config.toml")
    return wiring.enroller(
        config, key_store=SoftwareKeyStore(), clock=ManualClock(datetime.now(timezone.utc))
    )


def test_huge_rsa_size_attribute_does_not_abort_enrollment(
    tmp_path: Path, est: EstServer, caplog: pytest.LogCaptureFixture
) -> None:
    huge = _tlv(0x02, b"\x7f" + b"\xff" * 1999)
    est.options.csrattrs = _tlv(0x30, _tlv(0x30, _oid(RSA) + _tlv(0x31, huge)))
    with caplog.at_level(logging.WARNING):
        result = _enroller(tmp_path, est).enroll()
    assert result.changed
    assert "rsaEncryption size (not a small INTEGER, 2004 B)" in caplog.text


@pytest.mark.parametrize("max_response_bytes", [1024 * 1024, 4 * 1024 * 1024])
def test_a_megabyte_of_oids_logs_one_short_line(
    tmp_path: Path, est: EstServer, caplog: pytest.LogCaptureFixture, max_response_bytes: int
) -> None:
    """Refused by size (default limit) or parsed with the item cap (larger limit): either way
    the enrollment goes on and what is logged about /csrattrs stays short."""
    est.options.csrattrs = _tlv(
        0x30, b"".join(_oid([1, 3, 6, 1, 4, 1, 99999, n]) for n in range(95_000))
    )
    with caplog.at_level(logging.INFO):
        result = _enroller(tmp_path, est, max_response_bytes=max_response_bytes).enroll()
    assert result.changed
    lines = [r.getMessage() for r in caplog.records if "csrattrs" in r.getMessage()]
    assert lines and all(len(line) < 3000 for line in lines)


@pytest.mark.parametrize("suffix", [b"\x00", b"\x00\x00", b"\r\n\r\n  \t"])
def test_trailing_nul_or_whitespace_after_base64_is_honoured(
    tmp_path: Path, est: EstServer, suffix: bytes
) -> None:
    est.options.csrattrs = csrattrs_der(curve="secp384r1")
    est.options.csrattrs_trailing_garbage = False
    est.options.csrattrs_suffix = suffix
    result = _enroller(tmp_path, est).enroll()
    key = result.identity.certificate.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
