"""EstClient over a small fake Transport (the seam): what goes on the wire, decided without a
server. The real HTTPS path is covered against our EST server in test_enroll_*.py."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from agent.config import ProofOfPossession
from agent.errors import EnrollmentError, TransportError
from agent.est.auth import BasicCredentials
from agent.est.client import EstClient
from agent.est.transport import ClientIdentity, HttpResponse
from tests.support.ca import TestCA


@dataclass
class Sent:
    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes | None
    tls_version: str


@dataclass
class FakeConnection:
    tls_version: str
    tls_unique: bytes | None
    transport: FakeTransport
    provisional: bool = False
    handshake_seconds: float = 0.0

    def request(
        self, method: str, path: str, *, headers: Mapping[str, str], body: bytes | None = None
    ) -> HttpResponse:
        self.transport.sent.append(Sent(method, path, dict(headers), body, self.tls_version))
        return self.transport.answers.pop(0)


@dataclass
class FakeTransport:
    answers: list[HttpResponse]
    tls13: bool = True
    sent: list[Sent] = field(default_factory=list)
    connections: list[tuple[ClientIdentity | None, str | None]] = field(default_factory=list)

    @contextlib.contextmanager
    def connect(
        self,
        *,
        client_identity: ClientIdentity | None = None,
        max_tls_version: str | None = None,
        provisional: bool = False,
    ) -> Iterator[FakeConnection]:
        self.connections.append((client_identity, max_tls_version))
        if self.tls13 and max_tls_version != "1.2":
            yield FakeConnection("TLSv1.3", None, self, provisional)
        else:
            n = len(self.connections)
            yield FakeConnection("TLSv1.2", bytes([n]) * 12, self, provisional)


def answer(status: int, body: bytes = b"", **headers: str) -> HttpResponse:
    return HttpResponse(status, "", {k.replace("_", "-"): v for k, v in headers.items()}, body)


def certs_body(ca: TestCA) -> bytes:
    return base64.encodebytes(pkcs7.serialize_certificates([ca.cert], serialization.Encoding.DER))


CREDS = BasicCredentials("dev", "pw")
CHALLENGE = {"www_authenticate": 'Basic realm="x"'}


def enroll(client: EstClient, mode: ProofOfPossession = ProofOfPossession.AUTO) -> list[str | None]:
    challenges: list[str | None] = []

    def make_csr(challenge: str | None) -> bytes:
        challenges.append(challenge)
        return b"\x30\x00"

    client.enroll(make_csr, reenroll=False, proof_of_possession=mode)
    return challenges


def test_credentials_only_after_a_basic_challenge(test_ca: TestCA) -> None:
    transport = FakeTransport(
        [
            answer(401, **CHALLENGE),
            answer(200, certs_body(test_ca), content_type="application/pkcs7-mime"),
        ]
    )
    enroll(EstClient(transport=transport, credentials=CREDS))
    assert ["Authorization" in s.headers for s in transport.sent] == [False, True]
    assert transport.sent[1].headers["Content-Transfer-Encoding"] == "base64"
    assert transport.sent[1].path == "/.well-known/est/simpleenroll"


def test_no_basic_retry_for_another_scheme() -> None:
    transport = FakeTransport([answer(401, www_authenticate="Bearer")])
    with pytest.raises(EnrollmentError, match="authentication required"):
        enroll(EstClient(transport=transport, credentials=CREDS))
    assert len(transport.sent) == 1


def test_pop_is_rebuilt_for_each_connection(test_ca: TestCA) -> None:
    transport = FakeTransport(
        [answer(401, **CHALLENGE), answer(200, certs_body(test_ca))], tls13=False
    )
    challenges = enroll(EstClient(transport=transport, credentials=CREDS))
    assert challenges == [base64.b64encode(bytes([n]) * 12).decode() for n in (1, 2)]


def test_pop_always_caps_tls_at_12(test_ca: TestCA) -> None:
    transport = FakeTransport([answer(200, certs_body(test_ca))])
    challenges = enroll(EstClient(transport=transport), ProofOfPossession.ALWAYS)
    assert transport.connections == [(None, "1.2")]
    assert challenges[0] is not None
    auto = FakeTransport([answer(200, certs_body(test_ca))])
    assert enroll(EstClient(transport=auto)) == [None]  # TLS 1.3: no tls-unique


def test_503_is_retryable_with_retry_after() -> None:
    transport = FakeTransport([answer(503, retry_after="30")])
    with pytest.raises(TransportError) as info:
        enroll(EstClient(transport=transport))
    assert info.value.status == 503 and info.value.retry_after == 30


def test_202_reports_pending_with_the_csr(test_ca: TestCA) -> None:
    transport = FakeTransport([answer(202, retry_after="60")])
    outcome = EstClient(transport=transport, label="lbl").enroll(
        lambda _c: b"\x30\x00", reenroll=True, proof_of_possession=ProofOfPossession.NEVER
    )
    assert outcome.pending and outcome.retry_after == "60" and outcome.csr_der == b"\x30\x00"
    assert transport.sent[0].path == "/.well-known/est/lbl/simplereenroll"


@pytest.mark.parametrize(
    ("header", "expected"),
    [("²", None), ("9" * 5000, 1e12), ("Fri, 31 Dec 1999 23:59:59 GMT", None)],
)
def test_503_retry_after_garbage_is_ignored_not_raised(header: str, expected: float | None) -> None:
    transport = FakeTransport([answer(503, retry_after=header)])
    with pytest.raises(TransportError, match="/simpleenroll: server error HTTP 503") as info:
        enroll(EstClient(transport=transport))
    assert info.value.retry_after == expected


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_are_not_followed(status: int) -> None:
    transport = FakeTransport([answer(status, location="https://elsewhere/x")])
    with pytest.raises(EnrollmentError, match=rf"/simpleenroll: HTTP {status} .*redirect") as info:
        enroll(EstClient(transport=transport, credentials=CREDS))
    assert info.value.status == status
    assert len(transport.sent) == 1  # nothing sent to elsewhere, no credentials either
    assert "Authorization" not in transport.sent[0].headers


def test_server_text_in_errors_stays_on_one_line() -> None:
    folded = 'Basic realm="a",\r\n charset="UTF-8"'
    transport = FakeTransport([answer(401, b"line one\nline two\r\n", www_authenticate=folded)])
    with pytest.raises(EnrollmentError, match="demands HTTP Basic") as info:
        enroll(EstClient(transport=transport))
    assert "\n" not in str(info.value) and "\r" not in str(info.value)
    assert "line one line two" in str(info.value)
