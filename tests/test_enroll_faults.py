"""Every fault of the test EST server ends in one clear error, and the identity store is left
byte-for-byte as it was. Real server, real swtpm keys; the renew faults use mutual TLS with the
TPM key through the tpm2 OpenSSL provider (loaded once for the session TPM)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.clock import SystemClock
from agent.config import parse_config
from agent.enroll import Enroller
from agent.errors import AgentError, ChainValidationError, EnrollmentError, TransportError
from hal.tpm import TpmKeyStore
from tests.conftest import provider_path
from tests.support.enroll_env import config_text, snapshot
from tests.support.est_server import FAULTS, EstOptions, EstServer
from tests.support.swtpm import Swtpm

EXPECTED: dict[str, tuple[type[AgentError], str]] = {
    "5xx": (TransportError, "server error HTTP 500"),
    "garbage": (EnrollmentError, "neither base64 nor DER"),
    "other-key": (EnrollmentError, "for another key"),
    "wrong-issuer": (ChainValidationError, "does not chain to the EST CA"),
    "truncated": (TransportError, "connection closed after"),
    "hang": (TransportError, "no response within 0.5 s"),
    "oversized": (EnrollmentError, "exceeds est.max_response_bytes=65536"),
    "oversized-stream": (EnrollmentError, "exceeds est.max_response_bytes=65536"),
    "ca-cert": (EnrollmentError, "is a CA certificate"),
    "expired": (ChainValidationError, "expired at"),
    "html": (EnrollmentError, "unexpected Content-Type 'text/html'"),
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
    return Enroller(config=config, key_store=TpmKeyStore(tcti=tpm.tcti), clock=SystemClock())


@pytest.mark.parametrize("fault", FAULTS)
def test_enroll_fault_leaves_nothing(
    tmp_path: Path, est: EstServer, tpm2_provider: Swtpm, fault: str
) -> None:
    (tmp_path / "state").mkdir()
    before = snapshot(tmp_path / "state")
    est.options.fault = fault
    kind, message = EXPECTED[fault]
    with pytest.raises(kind, match=message) as info:
        enroller(tmp_path, est, tpm2_provider).enroll()
    assert "\n" not in str(info.value)
    assert snapshot(tmp_path / "state") == before


@pytest.mark.parametrize("fault", FAULTS)
def test_renew_fault_leaves_identity_unchanged(
    tmp_path: Path, est: EstServer, tpm2_provider: Swtpm, fault: str
) -> None:
    first = enroller(tmp_path, est, tpm2_provider).enroll()
    assert first.key_store == "tpm" and first.identity.key_in_tpm
    before = snapshot(tmp_path / "state")
    est.options.fault = fault
    kind, message = EXPECTED[fault]
    with pytest.raises(kind, match=message):
        enroller(tmp_path, est, tpm2_provider).renew()
    assert snapshot(tmp_path / "state") == before
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
