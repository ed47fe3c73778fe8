"""`classify(error) -> Disposition`: every branch of the error tree, exhaustively, and the exit
code each disposition gives (one per kind, as the README and `--help` list them)."""

from __future__ import annotations

import ast
import ssl
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.cli import EXIT_CODES, EXIT_CODES_HELP, build_parser, exit_code_for
from agent.errors import (
    AgentError,
    BootControlError,
    Busy,
    ChainValidationError,
    ConfigError,
    Disposition,
    EnrollmentError,
    EnrollmentPending,
    FirmwareVerificationError,
    HalError,
    IdentityExpired,
    KeyStoreError,
    Kind,
    NotEnrolled,
    ProviderError,
    Reported,
    RollbackError,
    StateConflict,
    StorageError,
    TransportError,
    TrustError,
    classify,
)
from tests.conftest import ROOT


def _caused(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


def _ssl_alert(reason: str) -> ssl.SSLError:
    e = ssl.SSLError(1, f"[SSL: {reason}] tlsv1 alert")
    e.reason = reason
    return e


CASES: list[tuple[BaseException, Kind, int]] = [
    (ConfigError("c"), Kind.CONFIG, 78),
    (Busy("b"), Kind.RETRY_SOON, 80),
    (EnrollmentPending("p", retry_after=42.0), Kind.WAIT_UNTIL, 75),
    (NotEnrolled("n"), Kind.NOT_ENROLLED, 81),
    (IdentityExpired("x"), Kind.IDENTITY_EXPIRED, 82),
    (StateConflict("s"), Kind.CONFLICT, 77),
    (TransportError("t"), Kind.RETRY_LATER, 69),
    (TransportError("t", status=503), Kind.RETRY_LATER, 69),
    (TransportError("t", status=503, retry_after=120.0), Kind.WAIT_UNTIL, 75),
    (EnrollmentError("e"), Kind.BAD_RESPONSE, 76),
    (EnrollmentError("e", status=200), Kind.BAD_RESPONSE, 76),
    (EnrollmentError("e", status=302), Kind.BAD_RESPONSE, 76),
    (EnrollmentError("e", status=400), Kind.REFUSED, 77),
    (EnrollmentError("e", status=401), Kind.REFUSED, 77),
    (EnrollmentError("e", status=499), Kind.REFUSED, 77),
    (EnrollmentError("e", status=500), Kind.BAD_RESPONSE, 76),
    (TrustError("t"), Kind.SECURITY_EVENT, 65),
    (ChainValidationError("c"), Kind.SECURITY_EVENT, 65),
    (FirmwareVerificationError("f"), Kind.SECURITY_EVENT, 65),
    (RollbackError("r"), Kind.SECURITY_EVENT, 65),
    (HalError("h"), Kind.LOCAL_FAULT, 74),
    (KeyStoreError("k"), Kind.LOCAL_FAULT, 74),
    (ProviderError("p"), Kind.LOCAL_FAULT, 74),
    (BootControlError("b"), Kind.LOCAL_FAULT, 74),
    (StorageError("s"), Kind.LOCAL_FAULT, 74),
    (OSError(5, "Input/output error"), Kind.LOCAL_FAULT, 74),
    # classified in the attempt process, carried as it was (agent/attempt_process.py)
    (Reported("r", Disposition(Kind.WAIT_UNTIL, wait_seconds=30)), Kind.WAIT_UNTIL, 75),
    (Reported("r", Disposition(Kind.SECURITY_EVENT)), Kind.SECURITY_EVENT, 65),
    (Reported("r", Disposition(Kind.INTERNAL)), Kind.INTERNAL, 1),
    (AgentError("an unclassified branch"), Kind.INTERNAL, 1),
    (ValueError("a bug"), Kind.INTERNAL, 1),
]

ALERTS = [
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
]


@pytest.mark.parametrize(("error", "kind", "code"), CASES, ids=lambda v: repr(v)[:40])
def test_classify_every_branch(error: BaseException, kind: Kind, code: int) -> None:
    assert classify(error).kind is kind
    assert exit_code_for(error) == code


def test_every_error_class_is_classified_on_purpose() -> None:
    """A new error class must get a case above (and so a deliberate disposition)."""
    import agent.errors as errors

    classes = {
        v
        for v in vars(errors).values()
        if isinstance(v, type) and issubclass(v, AgentError) and v is not AgentError
    }
    covered = {type(e) for e, _kind, _code in CASES}
    assert classes <= covered, classes - covered


def test_every_kind_has_its_own_exit_code_listed_in_help() -> None:
    assert set(EXIT_CODES) == set(Kind)
    shared = [c for c in EXIT_CODES.values() if list(EXIT_CODES.values()).count(c) > 1]
    assert shared == [77, 77]  # REFUSED and CONFLICT: both "a person must act"
    for code in set(EXIT_CODES.values()):
        assert f"\n  {code} " in EXIT_CODES_HELP
    assert EXIT_CODES_HELP in build_parser().format_help()
    readme = (ROOT / "README.md").read_text()
    for code in set(EXIT_CODES.values()):
        assert f"\n| {code} |" in readme, code


@pytest.mark.parametrize("reason", ALERTS)
def test_a_client_certificate_alert_anywhere_in_the_chain_is_client_rejected(reason: str) -> None:
    direct = _caused(TransportError("TLS handshake failed"), _ssl_alert(reason))
    assert classify(direct).kind is Kind.CLIENT_REJECTED
    assert exit_code_for(direct) == 83
    # TLS 1.3: the alert arrives on the first read, wrapped once more (a timeout, a read error)
    deeper = _caused(TransportError("read"), _caused(TransportError("x"), _ssl_alert(reason)))
    assert classify(deeper).kind is Kind.CLIENT_REJECTED
    context = TransportError("read")
    context.__context__ = _ssl_alert(reason)
    assert classify(context).kind is Kind.CLIENT_REJECTED
    assert classify(context).kind.security


@pytest.mark.parametrize(
    "reason", ["TLSV1_ALERT_PROTOCOL_VERSION", "SSLV3_ALERT_HANDSHAKE_FAILURE", "WRONG_VERSION"]
)
def test_other_tls_failures_stay_retry_later(reason: str) -> None:
    assert classify(_caused(TransportError("tls"), _ssl_alert(reason))).kind is Kind.RETRY_LATER


def test_a_client_alert_outside_transport_is_not_reinterpreted() -> None:
    error = _caused(ConfigError("c"), _ssl_alert("TLSV1_ALERT_UNKNOWN_CA"))
    assert classify(error).kind is Kind.CONFIG


def test_a_cause_cycle_ends() -> None:
    a, b = TransportError("a"), TransportError("b")
    a.__cause__, b.__cause__ = b, a
    assert classify(a).kind is Kind.RETRY_LATER


def test_wait_until_carries_the_time() -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    pending = classify(EnrollmentPending("p", retry_after=90.0))
    assert pending == Disposition(Kind.WAIT_UNTIL, wait_seconds=90.0)
    assert pending.until(now, maximum_seconds=86400) == now + timedelta(seconds=90)
    huge = classify(TransportError("t", status=503, retry_after=1e12))
    assert huge.until(now, maximum_seconds=86400) == now + timedelta(days=1)  # no overflow
    assert Disposition(Kind.WAIT_UNTIL, wait_seconds=-5).until(now, maximum_seconds=9) == now
    assert classify(Busy("b")).until(now, maximum_seconds=9) is None


def test_kind_properties() -> None:
    assert {k for k in Kind if k.retryable} == {
        Kind.RETRY_SOON,
        Kind.RETRY_LATER,
        Kind.WAIT_UNTIL,
        Kind.BAD_RESPONSE,
    }
    assert {k for k in Kind if k.reenroll} == {Kind.NOT_ENROLLED, Kind.IDENTITY_EXPIRED}
    assert {k for k in Kind if k.security} == {Kind.CLIENT_REJECTED, Kind.SECURITY_EVENT}


def test_busy_left_the_transport_branch() -> None:
    assert not issubclass(Busy, TransportError)


def _raised_names(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            func = node.exc.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            found.append((node.lineno, name))
    return found


def test_no_bare_agent_error_is_raised_anywhere() -> None:
    bare = [
        f"{path.relative_to(ROOT)}:{line}"
        for package in ("agent", "hal")
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, name in _raised_names(path)
        if name == "AgentError"
    ]
    assert bare == []
