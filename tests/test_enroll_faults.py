"""Every fault of the test EST server ends in one clear error, and the identity store is left
byte-for-byte as it was. Real server, real swtpm keys; the renew faults use mutual TLS with the
TPM key through the tpm2 OpenSSL provider (loaded once for the session TPM)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent import wiring
from agent.cli import exit_code_for
from agent.config import parse_config
from agent.enroll import Enroller
from agent.errors import (
    AgentError,
    ChainValidationError,
    EnrollmentError,
    TransportError,
    TrustError,
)
from hal.tpm import TpmKeyStore
from tests.conftest import provider_path
from tests.support.enroll_env import config_text, snapshot
from tests.support.est_server import FAULTS, EstOptions, EstServer
from tests.support.swtpm import Swtpm

#: fault -> the error, its message, and the CLI exit code the README documents for it
EXPECTED: dict[str, tuple[type[AgentError], str, int]] = {
    "5xx": (TransportError, "server error HTTP 500", 69),
    "garbage": (EnrollmentError, "neither base64 nor DER", 76),
    "other-key": (TrustError, "for another key", 65),
    "wrong-issuer": (ChainValidationError, "does not chain to the EST CA", 65),
    "truncated": (TransportError, "connection closed or reset after", 69),
    "reset": (TransportError, "connection closed or reset after|server closed the connection", 69),
    "hang": (TransportError, "no complete response within 0.5 s", 69),
    "oversized": (EnrollmentError, "exceeds est.max_response_bytes=65536", 76),
    "oversized-stream": (EnrollmentError, "exceeds est.max_response_bytes=65536", 76),
    "ca-cert": (EnrollmentError, "is a CA certificate", 76),
    "expired": (ChainValidationError, "expired at", 65),
    "html": (EnrollmentError, "unexpected Content-Type 'text/html'", 76),
    "redirect": (EnrollmentError, r"HTTP 302 .*redirect to https://elsewhere\.example/", 76),
    "empty": (EnrollmentError, "PKCS7 has no certificate data", 76),
    "not-pkcs7": (EnrollmentError, "not a PKCS#7 certs-only message", 76),
    "not-yet-valid": (ChainValidationError, "not valid before", 65),
    "no-digital-signature": (EnrollmentError, "does not allow digitalSignature", 76),
    "bad-extensions": (EnrollmentError, "malformed extensions", 76),
    "drip": (TransportError, "no complete response within 0.5 s", 69),
    "drip-headers": (TransportError, "no complete response within 0.5 s", 69),
    "server-eku": (EnrollmentError, "extendedKeyUsage does not allow clientAuth", 76),
    "issuer-not-ca": (ChainValidationError, r"not a CA \(basicConstraints cA=FALSE\)", 65),
    "pop-401": (EnrollmentError, "HTTP 401 Unauthorized: the server refused the proof-of-poss", 77),
    "pop-403": (EnrollmentError, "HTTP 403 Forbidden: the server refused the proof-of-poss", 77),
    "csr-attribute-400": (EnrollmentError, "HTTP 400 Bad Request: the server refused an attr", 77),
    "policy-403": (EnrollmentError, "HTTP 403 Forbidden: the server's policy refused", 77),
}


def test_every_fault_has_an_expectation() -> None:
    assert set(EXPECTED) == set(FAULTS)


@pytest.fixture
def est(tmp_path: Path) -> Iterator[EstServer]:
    with EstServer(tmp_path / "est", EstOptions(hang_seconds=5)) as server:
        yield server


def enroller(tmp_path: Path, est: EstServer, tpm: Swtpm) -> Enroller:
    text = config_text(
        state_dir=tmp_path / "state",
        est=est,
        tcti=tpm.tcti,
        provider=provider_path(),
        read_timeout_seconds=0.5,
        max_response_bytes=65536,
    )
    config = parse_config(text, source=tmp_path / "config.toml")
    return wiring.enroller(config, key_store=TpmKeyStore(tcti=tpm.tcti))


def expect_fault(fault: str, attempt: Callable[[], object], state_dir: Path) -> None:
    """`attempt` fails as EXPECTED says, in one line, and leaves `state_dir` as it was."""
    before = snapshot(state_dir)
    kind, message, code = EXPECTED[fault]
    with pytest.raises(kind, match=message) as info:
        attempt()
    assert "\n" not in str(info.value)
    assert exit_code_for(info.value) == code
    assert snapshot(state_dir) == before


@pytest.mark.parametrize("fault", FAULTS)
def test_enroll_fault_leaves_nothing(
    tmp_path: Path, est: EstServer, tpm2_provider: Swtpm, fault: str
) -> None:
    (tmp_path / "state").mkdir()
    est.options.fault = fault
    expect_fault(fault, enroller(tmp_path, est, tpm2_provider).enroll, tmp_path / "state")


@pytest.mark.parametrize("fault", FAULTS)
def test_renew_fault_leaves_identity_unchanged(
    tmp_path: Path, est: EstServer, tpm2_provider: Swtpm, fault: str
) -> None:
    first = enroller(tmp_path, est, tpm2_provider).enroll()
    assert first.key_store == "tpm" and first.identity.key_in_tpm
    est.options.fault = fault
    expect_fault(fault, enroller(tmp_path, est, tpm2_provider).renew, tmp_path / "state")
    assert est.records[-1].client_cert == "commonName=gw-0001"  # mTLS with the TPM key


def test_renew_with_tpm_key_over_mutual_tls(
    tmp_path: Path, est: EstServer, tpm2_provider: Swtpm
) -> None:
    est.options.tls12_only = True
    est.options.pop_required = True
    first = enroller(tmp_path, est, tpm2_provider).enroll().identity
    result = enroller(tmp_path, est, tpm2_provider).renew()
    assert result.proof_of_possession and result.identity.generation == 2
    assert result.identity.key_file.read_bytes() != first.key_file.read_bytes()
    assert result.identity.key_file.read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY")


@pytest.mark.parametrize("fault", ["5xx", "wrong-issuer"])
def test_failed_renewals_do_not_pin_tpm_object_slots(
    tmp_path: Path, est: EstServer, tpm2_provider: Swtpm, fault: str
) -> None:
    """Each SSLContext with the TPM key holds a TPM object slot (swtpm has 3) until freed; an
    error must not keep it alive through its traceback."""
    enroller(tmp_path, est, tpm2_provider).enroll()
    est.options.fault = fault
    kept: list[BaseException] = []  # as a daemon keeps its last errors, for `status`
    for _ in range(4):
        with pytest.raises((TransportError, ChainValidationError)) as info:
            enroller(tmp_path, est, tpm2_provider).renew()
        kept.append(info.value)
    est.options.fault = None
    assert enroller(tmp_path, est, tpm2_provider).renew().changed
