"""Fewer round trips: one kept-alive connection per operation, the stored CA set instead of
/cacerts, the /csrattrs answer reused, Basic remembered per server. Real server, software keys."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agent import wiring
from agent.clock import ManualClock
from agent.config import parse_config
from agent.enroll import Enroller
from agent.errors import TransportError
from agent.est.memory import FILE_NAME, ServerMemory
from agent.est.transport import HttpsTransport
from hal.softkeys import SoftwareKeyStore
from tests.support.ca import TestCA, pem, utcnow
from tests.support.enroll_env import config_text, password_file
from tests.support.est_server import EstOptions, EstServer


@pytest.fixture
def est(tmp_path: Path) -> Iterator[EstServer]:
    with EstServer(tmp_path / "est", EstOptions(auth="basic", keep_alive=True)) as server:
        yield server


class Device:
    def __init__(self, tmp_path: Path, est: EstServer) -> None:
        self.tmp_path, self.est = tmp_path, est
        self.state_dir = tmp_path / "state"
        self.clock = ManualClock(datetime.now(timezone.utc))
        self.password = password_file(tmp_path)

    def enroller(self, **keys: Any) -> Enroller:
        text = config_text(
            state_dir=self.state_dir,
            est=self.est,
            store="software",
            username="device",
            password_file=str(self.password),
            **keys,
        )
        config = parse_config(text, source=self.tmp_path / "config.toml")
        return wiring.enroller(config, key_store=SoftwareKeyStore(), clock=self.clock)

    def wire(self) -> list[tuple[str, int, bool, int]]:
        records = [(r.operation, r.status, r.authorization, r.connection) for r in self.est.records]
        self.est.records.clear()
        return records


@pytest.fixture
def device(tmp_path: Path, est: EstServer) -> Device:
    return Device(tmp_path, est)


def test_first_enroll_is_one_connection_then_one_request(device: Device) -> None:
    enroller = device.enroller()
    enroller.enroll()
    assert device.wire() == [
        ("cacerts", 200, False, 1),
        ("csrattrs", 200, False, 1),
        ("simpleenroll", 401, False, 1),
        ("simpleenroll", 200, True, 1),  # the retry on the same connection
    ]
    assert enroller.last_counts == (4, 1)
    # stored CA set, cached /csrattrs, Basic remembered: one request
    again = device.enroller()
    again.enroll(force=True)
    assert device.wire() == [("simpleenroll", 200, True, 2)]
    assert again.last_counts == (1, 1)
    renewer = device.enroller()
    renewer.renew()
    assert device.wire() == [("simplereenroll", 200, True, 3)]
    assert renewer.last_counts == (1, 1)


def test_savings_are_visible_in_the_log(device: Device, caplog: pytest.LogCaptureFixture) -> None:
    device.enroller().enroll()
    with caplog.at_level(logging.INFO):
        device.enroller().enroll(force=True)
    text = caplog.text
    assert "this server demanded HTTP Basic before" in text
    assert "/csrattrs: reusing the answer fetched at" in text
    assert "1 request(s) over 1 TLS connection(s); /cacerts not fetched (stored CA set)" in text


def test_proof_of_possession_on_the_kept_alive_connection(device: Device) -> None:
    device.est.options.tls12_only = True
    device.est.options.pop_required = True
    result = device.enroller(proof_of_possession="always").enroll()
    assert result.proof_of_possession
    wire = device.wire()
    assert [w[3] for w in wire] == [1, 1, 1, 1]  # the CSR carries this connection's tls-unique
    assert wire[-1][:2] == ("simpleenroll", 200)


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_a_connection_the_server_dropped_is_replaced_once(device: Device, limit: int) -> None:
    device.est.options.keep_alive_requests = limit  # closed without Connection: close
    device.est.options.tls12_only = True
    device.est.options.pop_required = True
    result = device.enroller(proof_of_possession="always").enroll()
    assert result.proof_of_possession  # the CSR rebuilt for the new connection's tls-unique
    wire = device.wire()
    assert [w[:2] for w in wire] == [
        ("cacerts", 200), ("csrattrs", 200), ("simpleenroll", 401), ("simpleenroll", 200),
    ]  # fmt: skip
    assert [w[3] for w in wire] == [1 + i // limit for i in range(4)]


def test_a_server_that_closes_gets_one_connection_per_request(device: Device) -> None:
    device.est.options.keep_alive = False
    enroller = device.enroller()
    enroller.enroll()
    assert [w[3] for w in device.wire()] == [1, 2, 3, 4]
    assert enroller.last_counts == (4, 4)


def test_csrattrs_refetched_after_max_age(device: Device) -> None:
    device.enroller(csrattrs_max_age_seconds=60).enroll()
    device.wire()
    device.clock.sleep(30)
    device.enroller(csrattrs_max_age_seconds=60).enroll(force=True)
    assert [w[0] for w in device.wire()] == ["simpleenroll"]
    device.clock.sleep(31)
    device.enroller(csrattrs_max_age_seconds=60).enroll(force=True)
    assert [w[0] for w in device.wire()] == ["csrattrs", "simpleenroll"]
    device.enroller(csrattrs_max_age_seconds=0).enroll(force=True)
    assert [w[0] for w in device.wire()] == ["csrattrs", "simpleenroll"]


def test_a_stored_ca_set_not_from_this_server_is_not_used(device: Device) -> None:
    device.enroller().enroll()
    device.wire()
    stored = device.state_dir / "cacerts.pem"
    stored.write_bytes(pem(TestCA(name="planted CA").cert))
    device.enroller().enroll(force=True)
    assert [w[0] for w in device.wire()] == ["cacerts", "simpleenroll"]
    assert stored.read_bytes() == pem(device.est.ca.cert)


def test_a_ca_rollover_refreshes_the_stored_set_once(device: Device) -> None:
    device.enroller().enroll()
    device.wire()
    device.est.ca = TestCA(name="EST CA 2", parent=device.est.root)  # a new issuing CA
    result = device.enroller().enroll(force=True)
    assert result.identity.certificate.issuer == device.est.ca.cert.subject
    # the stored set did not validate the new certificate: /cacerts asked once, then it did
    assert [w[0] for w in device.wire()] == ["simpleenroll", "cacerts"]
    device.enroller().enroll(force=True)
    assert [w[0] for w in device.wire()] == ["csrattrs", "simpleenroll"]  # new CA set


def test_memory_is_forgotten_when_the_anchor_changes(device: Device, tmp_path: Path) -> None:
    device.enroller().enroll()
    device.wire()
    memory = json.loads((device.state_dir / FILE_NAME).read_text())
    assert memory["basic"] is True
    anchor = tmp_path / "anchor-copy.pem"
    anchor.write_bytes(device.est.ca_file.read_bytes() + b"\n")
    device.enroller(trust_anchor=str(anchor)).enroll(force=True)
    assert [(w[0], w[2]) for w in device.wire()] == [
        ("cacerts", False),  # the stored set came under another anchor file
        ("csrattrs", False),
        ("simpleenroll", False),  # and so did the Basic memory
        ("simpleenroll", True),
    ]


def test_csrattrs_cache_decision_is_pure() -> None:
    now = utcnow()
    memory = ServerMemory(
        server="s", anchor_sha256="a", csrattrs=b"\x30\x00", csrattrs_fetched=now,
        ca_set_sha256="ca",
    )  # fmt: skip
    hour = timedelta(hours=1)
    assert memory.csrattrs_for(ca_set_sha256="ca", now=now, max_age=hour) == b"\x30\x00"
    assert memory.csrattrs_for(ca_set_sha256="other", now=now, max_age=hour) is None
    assert memory.csrattrs_for(ca_set_sha256="ca", now=now + 2 * hour, max_age=hour) is None
    assert memory.csrattrs_for(ca_set_sha256="ca", now=now - hour, max_age=hour) is None
    assert memory.csrattrs_for(ca_set_sha256="ca", now=now, max_age=timedelta(0)) is None


def test_a_closed_connection_is_never_reopened_in_plain_tcp(device: Device) -> None:
    device.est.options.keep_alive = False
    transport = HttpsTransport(url=device.est.url, ca_file=device.est.ca_file)
    with transport.connect() as conn:
        conn.request("GET", "/.well-known/est/cacerts", headers={})
        assert not conn.reusable
        with pytest.raises(TransportError, match="closed this connection before"):
            conn.request("GET", "/.well-known/est/cacerts", headers={})
    assert len(device.est.records) == 1


def test_a_202_without_length_ends_the_kept_alive_connection(device: Device) -> None:
    from agent.errors import EnrollmentPending

    device.est.options.pending = 1
    with pytest.raises(EnrollmentPending):
        device.enroller(retry_after_min_seconds=0).enroll()
    assert [w[:2] for w in device.wire()][-1] == ("simpleenroll", 202)
    device.clock.sleep(5)
    result = device.enroller(retry_after_min_seconds=0).enroll()
    assert result.changed
    assert [w[:2] for w in device.wire()][-1] == ("simpleenroll", 200)
