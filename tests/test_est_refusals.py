"""4xx refusals name their real cause: proof-of-possession, a CSR attribute, a policy; only a
Basic challenge after our credentials is "credentials rejected"."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from agent import wiring
from agent.clock import ManualClock
from agent.config import parse_config
from agent.enroll import Enroller
from agent.errors import EnrollmentError
from agent.est.client import refusal_cause
from agent.est.transport import HttpResponse
from hal.softkeys import SoftwareKeyStore
from tests.support.enroll_env import config_text, password_file, snapshot
from tests.support.est_server import EstOptions, EstServer


@pytest.fixture
def est(tmp_path: Path) -> Iterator[EstServer]:
    with EstServer(tmp_path / "est", EstOptions(auth="basic")) as server:
        yield server


def _enroller(tmp_path: Path, est: EstServer, **keys: object) -> Enroller:
    text = config_text(
        state_dir=tmp_path / "state",
        est=est,
        store="software",
        username="device",
        password_file=str(password_file(tmp_path)),
        **keys,
    )
    config = parse_config(text, source=tmp_path / "config.toml")
    return wiring.enroller(
        config, key_store=SoftwareKeyStore(), clock=ManualClock(datetime.now(timezone.utc))
    )


def test_pop_mismatch_after_good_credentials_is_named_as_such(
    tmp_path: Path, est: EstServer
) -> None:
    """What a deployed server answers when it requires proof-of-possession and the CSR has
    none: 401 with a Basic challenge and "Proof of Possession Mismatch." in the body."""
    est.options.fault = "pop-401"
    with pytest.raises(EnrollmentError) as info:
        _enroller(tmp_path, est, proof_of_possession="never").enroll()
    message = str(info.value)
    assert message.startswith(
        "/simpleenroll: HTTP 401 Unauthorized: the server refused the proof-of-possession"
    )
    assert "credentials" not in message.split("(Proof")[0].replace("Basic credentials", "")
    assert "Proof of Possession Mismatch." in message
    assert info.value.status == 401
    enrolls = [(r.status, r.authorization) for r in est.records if r.operation == "simpleenroll"]
    assert enrolls == [(401, False), (401, True)]  # one retry with credentials, no more
    assert snapshot(tmp_path / "state") == {}


def test_wrong_credentials_are_still_credentials(tmp_path: Path, est: EstServer) -> None:
    est.options.password = "something-else"
    with pytest.raises(EnrollmentError, match=r"^/simpleenroll: HTTP 401: the server rejected "
                       "our Basic credentials"):  # fmt: skip
        _enroller(tmp_path, est).enroll()


@pytest.mark.parametrize(
    ("fault", "start"),
    [
        ("pop-403", "/simpleenroll: HTTP 403 Forbidden: the server refused the proof-of-poss"),
        ("csr-attribute-400", "/simpleenroll: HTTP 400 Bad Request: the server refused an attr"),
        ("policy-403", "/simpleenroll: HTTP 403 Forbidden: the server's policy refused"),
    ],
)
def test_other_refusals_name_their_cause(
    tmp_path: Path, est: EstServer, fault: str, start: str
) -> None:
    est.options.fault = fault
    with pytest.raises(EnrollmentError) as info:
        _enroller(tmp_path, est).enroll()
    assert str(info.value).startswith(start)
    assert "\n" not in str(info.value)


def _response(status: int, reason: str, body: bytes = b"", **headers: str) -> HttpResponse:
    return HttpResponse(status=status, reason=reason, headers=headers, body=body)


@pytest.mark.parametrize(
    ("response", "cause"),
    [
        (_response(401, "Proof of Possession Mismatch."), "proof-of-possession"),
        (_response(400, "Bad Request", b"tls-unique does not match"), "proof-of-possession"),
        (
            _response(401, "Unauthorized", **{"www-authenticate": 'Basic realm="pop"'}),
            "proof-of-possession",
        ),
        (_response(400, "Bad Request", b"missing CSR attribute macAddress"), "attribute"),
        (_response(403, "Forbidden", b"denied by certificate profile"), "policy"),
        (_response(401, "Unauthorized", **{"www-authenticate": 'Basic realm="est"'}), None),
        (_response(403, "Forbidden", b"client certificate required"), None),
    ],
)
def test_refusal_cause(response: HttpResponse, cause: str | None) -> None:
    found = refusal_cause(response)
    if cause is None:
        assert found is None
    else:
        assert found is not None and cause in found
