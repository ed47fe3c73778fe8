"""Enrollment against our real EST server over real HTTPS, in-process with software keys (fast).

TPM keys, the CLI and faults are covered in test_enroll_cli.py and test_enroll_faults.py.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent import wiring
from agent.cli import exit_code_for
from agent.clock import ManualClock
from agent.config import parse_config
from agent.enroll import Enroller
from agent.errors import (
    Busy,
    ChainValidationError,
    ConfigError,
    EnrollmentError,
    EnrollmentPending,
    NotEnrolled,
    TransportError,
)
from agent.est.transport import HttpsTransport
from agent.est.trust import ANCHOR_FILE_NAME
from agent.identity import LOCK_FILE_NAME
from agent.pki import public_key_der
from hal.softkeys import SoftwareKeyStore
from tests.support.enroll_env import config_text, password_file, snapshot
from tests.support.est_server import EstOptions, EstServer, csrattrs_der


class Env:
    def __init__(self, tmp_path: Path, est: EstServer) -> None:
        self.tmp_path = tmp_path
        self.est = est
        self.state_dir = tmp_path / "state"
        self.clock = ManualClock(datetime.now(timezone.utc))
        self.password = password_file(tmp_path)

    def enroller(self, **est_keys: Any) -> Enroller:
        text = config_text(state_dir=self.state_dir, est=self.est, store="software", **est_keys)
        config = parse_config(text, source=self.tmp_path / "config.toml")
        return wiring.enroller(config, key_store=SoftwareKeyStore(), clock=self.clock)

    def basic(self, **est_keys: Any) -> Enroller:
        return self.enroller(username="device", password_file=str(self.password), **est_keys)


@pytest.fixture
def est(tmp_path: Path) -> Iterator[EstServer]:
    with EstServer(tmp_path / "est", EstOptions()) as server:
        yield server


@pytest.fixture
def env(tmp_path: Path, est: EstServer) -> Env:
    return Env(tmp_path, est)


def enroll_records(est: EstServer) -> list[Any]:
    return [r for r in est.records if r.operation in ("simpleenroll", "simplereenroll")]


# -- authentication ----------------------------------------------------------------------------


def test_basic_sent_only_after_the_401_challenge(env: Env) -> None:
    env.est.options.auth = "basic"
    result = env.basic().enroll()
    assert result.changed and result.identity.generation == 1
    assert [(r.operation, r.status, r.authorization) for r in env.est.records] == [
        ("cacerts", 200, False),
        ("csrattrs", 200, False),
        ("simpleenroll", 401, False),
        ("simpleenroll", 200, True),
    ]


def test_basic_upfront_when_configured(env: Env) -> None:
    env.est.options.auth = "basic"
    env.basic(send_credentials_upfront=True).enroll()
    assert [(r.status, r.authorization) for r in enroll_records(env.est)] == [(200, True)]


def test_basic_demanded_but_not_configured(env: Env) -> None:
    env.est.options.auth = "basic"
    with pytest.raises(EnrollmentError, match=r"demands HTTP Basic .* est.username") as info:
        env.enroller().enroll()
    assert info.value.status == 401


def test_wrong_password_is_rejected_once(env: Env) -> None:
    env.est.options.auth = "basic"
    env.est.options.password = "something-else"
    with pytest.raises(EnrollmentError, match="rejected our Basic credentials"):
        env.basic().enroll()
    assert [r.status for r in enroll_records(env.est)] == [401, 401]


def test_untrusted_server_gets_nothing(env: Env, tmp_path: Path) -> None:
    env.est.options.auth = "basic"
    other = tmp_path / "other-ca.pem"
    from tests.support.ca import TestCA

    TestCA(name="other").write_cert(other)
    with pytest.raises(ChainValidationError, match="not trusted"):
        env.basic(trust_anchor=str(other), send_credentials_upfront=True).enroll()
    assert env.est.records == []  # not even a request line, let alone a password
    assert snapshot(env.state_dir) == {}


def test_label_goes_into_every_path(env: Env) -> None:
    env.est.options.label = "gateways"
    env.enroller(label="gateways").enroll()
    assert all(r.path.startswith("/.well-known/est/gateways/") for r in env.est.records)


# -- proof-of-possession -----------------------------------------------------------------------


def test_pop_over_tls12(env: Env) -> None:
    env.est.options.tls12_only = True
    env.est.options.pop_required = True
    result = env.enroller().enroll()
    assert result.proof_of_possession and result.tls_version == "TLSv1.2"
    challenge = enroll_records(env.est)[-1].challenge_password
    assert challenge is not None and len(base64.b64decode(challenge)) >= 12


def test_pop_auto_on_tls13_sends_none_and_always_forces_tls12(env: Env) -> None:
    env.est.options.pop_required = True
    with pytest.raises(EnrollmentError, match="proof-of-possession failed") as info:
        env.enroller().enroll()  # auto: TLS 1.3 has no tls-unique
    assert info.value.status == 400
    result = env.enroller(proof_of_possession="always").enroll()
    assert result.tls_version == "TLSv1.2" and result.proof_of_possession


def test_pop_never(env: Env) -> None:
    env.est.options.tls12_only = True
    result = env.enroller(proof_of_possession="never").enroll()
    assert not result.proof_of_possession
    assert enroll_records(env.est)[-1].challenge_password is None


# -- csrattrs ----------------------------------------------------------------------------------


def test_csrattrs_key_curve_and_hash_are_honoured(env: Env) -> None:
    env.est.options.csrattrs = csrattrs_der(curve="secp384r1", oids=("ecdsaWithSHA384",))
    cert = env.enroller().enroll().identity.certificate
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    csr = x509.load_der_x509_csr(enroll_records(env.est)[-1].csr or b"")
    assert csr.signature_hash_algorithm is not None
    assert csr.signature_hash_algorithm.name == "sha384"


def test_csrattrs_missing_or_disabled(env: Env) -> None:
    env.est.options.csrattrs = None  # 404
    env.enroller().enroll()
    env.est.records.clear()
    env.enroller(use_csrattrs=False).enroll(force=True)
    assert "csrattrs" not in env.est.operations()


def test_csrattrs_failure_is_tolerated_but_refusal_is_not(env: Env) -> None:
    env.est.options.csrattrs_status = 500
    assert env.enroller().enroll().changed
    env.est.options.csrattrs_status = 403
    with pytest.raises(EnrollmentError, match="HTTP 403") as info:
        env.enroller().enroll(force=True)
    assert info.value.status == 403


# -- idempotence, renewal ----------------------------------------------------------------------


def test_enroll_is_idempotent_unless_forced(env: Env) -> None:
    first = env.enroller().enroll()
    env.est.records.clear()
    again = env.enroller().enroll()
    assert not again.changed and again.identity.generation == first.identity.generation
    assert env.est.records == []
    forced = env.enroller().enroll(force=True)
    assert forced.changed and forced.identity.generation == 2


def test_renew_new_key_then_reuse_key(env: Env) -> None:
    env.est.options.auth = "basic"  # Basic on top of the client certificate
    first = env.basic().enroll().identity
    renewed = env.basic().renew().identity
    assert renewed.generation == 2
    assert renewed.certificate.subject == first.certificate.subject
    assert public_key_der(renewed.certificate.public_key()) != public_key_der(
        first.certificate.public_key()
    )
    record = enroll_records(env.est)[-1]
    assert record.operation == "simplereenroll" and record.client_cert == "commonName=gw-0001"
    again = env.basic().renew(reuse_key=True).identity
    assert public_key_der(again.certificate.public_key()) == public_key_der(
        renewed.certificate.public_key()
    )
    assert again.key_file.read_bytes() == renewed.key_file.read_bytes()


def test_renew_without_identity(env: Env) -> None:
    with pytest.raises(NotEnrolled, match="run `devid-agent enroll` first") as info:
        env.enroller().renew()
    assert exit_code_for(info.value) == 81  # not enrolled, not a server or disk error
    assert env.est.records == []


# -- 202 Retry-After ---------------------------------------------------------------------------


def test_pending_request_survives_and_is_resubmitted_unchanged(env: Env) -> None:
    env.est.options.pending = 1
    env.est.options.retry_after = "120"
    with pytest.raises(EnrollmentPending) as info:
        env.enroller().enroll()
    assert info.value.retry_after == 120
    pending = env.state_dir / "est-pending.json"
    assert pending.stat().st_mode & 0o777 == 0o600
    assert not (env.state_dir / "identity").exists()
    contacted = len(env.est.records)
    env.clock.sleep(60)  # a restart before Retry-After elapsed: no contact at all
    with pytest.raises(EnrollmentPending, match="not contacting the server") as info:
        env.enroller().enroll()
    assert 59 <= info.value.retry_after <= 60
    assert len(env.est.records) == contacted
    env.clock.sleep(61)
    result = env.enroller().enroll()
    assert result.changed and not pending.exists()
    first, second = (r.csr for r in enroll_records(env.est))
    assert first == second  # the very same CSR


@pytest.mark.parametrize("tls13_offered_later", [False, True])
def test_pending_with_pop_keeps_the_key_and_rebinds(env: Env, tls13_offered_later: bool) -> None:
    env.est.options.tls12_only = True
    env.est.options.pop_required = True
    env.est.options.pending = 1
    with pytest.raises(EnrollmentPending):
        env.enroller().enroll()
    # proof_of_possession = "auto": the resubmission must still use TLS 1.2, or the stale
    # challengePassword of the first connection would go out
    env.est.options.tls12_only = not tls13_offered_later
    env.clock.sleep(env.enroller()._est.retry_after_max_seconds)
    result = env.enroller().enroll()
    assert result.proof_of_possession and result.tls_version == "TLSv1.2"
    first_record, second_record = enroll_records(env.est)
    assert first_record.challenge_password != second_record.challenge_password  # rebound
    first, second = (x509.load_der_x509_csr(r.csr or b"") for r in enroll_records(env.est))
    assert public_key_der(first.public_key()) == public_key_der(second.public_key())
    assert first.subject == second.subject
    assert list(first.extensions) == list(second.extensions)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("100000", 3600.0),
        (None, 42.0),
        ("0", 5.0),
        ("Fri, 31 Dec 9999 23:59:59 GMT", 3600.0),  # HTTP-date, far away
        ("Mon, 01 Jan 2001 00:00:00 GMT", 5.0),  # HTTP-date, past
        ("-30", 42.0),
        ("soon", 42.0),
        ("²", 42.0),
        ("9" * 5000, 3600.0),
    ],
)
def test_retry_after_is_bounded(env: Env, header: str | None, expected: float) -> None:
    env.est.options.pending = 1
    env.est.options.retry_after = header
    with pytest.raises(EnrollmentPending) as info:
        env.enroller(
            retry_after_min_seconds=5, retry_after_max_seconds=3600, retry_after_default_seconds=42
        ).enroll()
    assert info.value.retry_after == expected


# -- trust bootstrap ---------------------------------------------------------------------------


def test_fingerprint_bootstrap_stores_the_anchor(env: Env) -> None:
    result = env.enroller(trust_anchor="", bootstrap_fingerprint_sha256=env.est.ca_fingerprint)
    result.enroll()
    anchor = env.state_dir / ANCHOR_FILE_NAME
    assert anchor.read_bytes() == env.est.ca_file.read_bytes()
    assert anchor.stat().st_mode & 0o777 == 0o600
    assert env.est.operations().count("cacerts") == 3  # provisional, verifying, the real one
    env.est.records.clear()  # the next run uses the stored anchor: no bootstrap fetches, and
    env.enroller(trust_anchor="", bootstrap_fingerprint_sha256=env.est.ca_fingerprint).enroll(
        force=True
    )  # the stored CA set and /csrattrs answer: one request
    assert env.est.operations() == ["simpleenroll"]


def test_wrong_fingerprint_changes_nothing(env: Env) -> None:
    env.est.options.auth = "basic"
    env.state_dir.mkdir()
    before = snapshot(env.state_dir)
    with pytest.raises(ChainValidationError, match="no certificate from /cacerts has"):
        env.basic(trust_anchor="", bootstrap_fingerprint_sha256="ab" * 32).enroll()
    assert snapshot(env.state_dir) == before
    assert [r.operation for r in env.est.records] == ["cacerts"]
    assert not any(r.authorization for r in env.est.records)


def test_no_anchor_at_all_is_a_config_error(env: Env) -> None:
    with pytest.raises(ConfigError, match="no trust anchor"):
        env.enroller(trust_anchor="").enroll()
    assert snapshot(env.state_dir) == {}


# -- hardening ---------------------------------------------------------------------------------


@contextlib.contextmanager
def held_lock(state_dir: Path) -> Iterator[None]:
    """The enrollment lock, held through its own open file (as another process would)."""
    state_dir.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(state_dir / LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def test_a_second_enrollment_at_once_is_refused_and_changes_nothing(env: Env) -> None:
    env.enroller().enroll()
    before = snapshot(env.state_dir)
    env.est.records.clear()
    with held_lock(env.state_dir):
        for attempt in (lambda: env.enroller().renew(), lambda: env.enroller().enroll(force=True)):
            with pytest.raises(Busy, match="another devid-agent process") as info:
                attempt()
            assert not isinstance(info.value, TransportError)  # nothing went over the network
            assert exit_code_for(info.value) == 80  # busy: retry in a moment
    assert env.est.records == []
    assert snapshot(env.state_dir) == before
    assert env.enroller().renew().identity.generation == 2  # released with its holder
    assert (env.state_dir / LOCK_FILE_NAME).stat().st_mode & 0o777 == 0o600


def test_content_length_that_is_not_ascii_digits_is_read_to_the_close(env: Env) -> None:
    env.est.options.content_length = "²"  # "²".isdigit() is True; int("²") raises
    assert env.enroller().enroll().changed


def test_503_with_unparseable_retry_after_is_a_clean_transport_error(env: Env) -> None:
    env.est.options.fault = "5xx"
    env.est.options.retry_after_503 = "9" * 5000
    with pytest.raises(TransportError, match="HTTP 503") as info:
        env.enroller().enroll()
    assert info.value.retry_after == 1e12  # saturated; the scheduler clamps


def test_3xx_on_csrattrs_is_not_fatal(env: Env) -> None:
    env.est.options.csrattrs_status = 302
    assert env.enroller().enroll().changed


@pytest.mark.parametrize("host", ["a..b", "a" * 64 + ".example"])
def test_a_host_name_idna_refuses_is_a_config_error_not_a_traceback(
    tmp_path: Path, host: str
) -> None:
    url = f"https://{host}:8443"
    with pytest.raises(ConfigError, match=r"est\.url.*valid DNS name"):
        parse_config(f'[device]\nid = "gw"\n[est]\nurl = "{url}"\n', source=tmp_path / "c.toml")
    transport = HttpsTransport(url=url, ca_file=None)  # built without the config check
    with (
        pytest.raises(ConfigError, match=r"est\.url: .* is not a valid host name"),
        transport.connect(provisional=True),
    ):
        pass


def test_password_never_reaches_a_log_line(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    env.est.options.auth = "basic"
    caplog.set_level(logging.DEBUG)
    env.basic().enroll()
    assert env.est.records[-1].authorization
    secret = env.password.read_text().strip()
    token = base64.b64encode(f"device:{secret}".encode()).decode()
    assert caplog.records
    assert not [r for r in caplog.records if secret in r.getMessage() or token in r.getMessage()]


def test_a_changed_bootstrap_fingerprint_does_not_silently_keep_the_stored_anchor(
    env: Env,
) -> None:
    env.enroller(trust_anchor="", bootstrap_fingerprint_sha256=env.est.ca_fingerprint).enroll()
    before = snapshot(env.state_dir)
    env.est.records.clear()
    other = env.est.rogue_ca.cert.fingerprint(hashes.SHA256()).hex()
    with pytest.raises(ConfigError, match=f"does not match the anchor .*/{ANCHOR_FILE_NAME} "):
        env.enroller(trust_anchor="", bootstrap_fingerprint_sha256=other).enroll(force=True)
    assert env.est.records == []
    assert snapshot(env.state_dir) == before
