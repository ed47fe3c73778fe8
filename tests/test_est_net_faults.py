"""Network faults of the EST server against `devid-agent enroll` and `renew` as real processes:
a server dripping its response or its handshake a byte a second, a TCP reset mid-body, a
server certificate for another host, an expired one, a man in the middle with another CA's
chain, a server that offers only TLS 1.1.

Each ends in one line naming the fault, the exit code classify() gives it (a trust failure 65,
the network 69), within the configured limits: the run's `timeout` (the deadline plus a margin
for starting Python) turns a client that would wait on into a failure; nothing measures time.
Every file under the state directory is byte-identical before and after.
"""

from __future__ import annotations

import base64
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.clock import Interrupt
from agent.est.transport import HttpsTransport, Interrupted
from tests.support.device import Device
from tests.support.enroll_env import snapshot
from tests.support.est_server import TLS_FAULTS, EstOptions, EstServer
from tests.support.swtpm import Swtpm

#: what a run may take on top of the deadline under test: start-up (imports, the provider, the
#: TPM), the requests before the faulty one, a loaded machine
MARGIN_SECONDS = 30.0
DEADLINE_SECONDS = 2.0
#: a byte a second: the 1200-byte drip would take 20 minutes, each recv only one second
DRIP_SECONDS = 1.0


@dataclass(frozen=True)
class Case:
    server: dict[str, Any]
    message: str  # a regular expression the one line must match
    code: int
    config: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, Case] = {
    "drip": Case(
        {"fault": "drip", "drip_seconds": DRIP_SECONDS},
        r"POST https://localhost:\d+/\.well-known/est/simple(re)?enroll: no complete response "
        r"within 2 s \(est\.read_timeout_seconds\)",
        69,
        {"read_timeout_seconds": DEADLINE_SECONDS},
    ),
    "drip-handshake": Case(
        {"tls_fault": "drip-handshake", "drip_seconds": DRIP_SECONDS},
        r"TLS handshake with localhost:\d+: not done within 2 s \(est\.connect_timeout_seconds\)",
        69,
        {"connect_timeout_seconds": DEADLINE_SECONDS},
    ),
    "reset": Case(
        # the reset may overtake data still in the receive queue (the kernel drops it), and
        # OpenSSL reads a reset as an end of stream: the body, or the headers, are cut short
        {"fault": "reset"},
        r"simple(re)?enroll: (connection closed or reset after \d+ of \d+ bytes"
        r"|server closed the connection)",
        69,
    ),
    "other-host": Case(
        {"tls_fault": "other-host"},
        r"EST server localhost:\d+ is not trusted: its certificate is for another host name, not "
        r"'localhost' of est\.url \(Hostname mismatch, certificate is not valid for 'localhost'",
        65,
    ),
    "expired-cert": Case(
        {"tls_fault": "expired-cert"},
        r"EST server localhost:\d+ is not trusted: its certificate has expired \(or this "
        r"device's clock is ahead\) \(certificate has expired\)",
        65,
    ),
    "rogue-ca": Case(
        {"tls_fault": "rogue-ca"},
        r"EST server localhost:\d+ is not trusted: its chain ends in a root that is not the "
        r"trust anchor \(another CA: a man in the middle, or the wrong est\.trust_anchor\)",
        65,
    ),
    "tls1.1-only": Case(
        {"tls_fault": "tls1.1-only"},
        r"TLS handshake with localhost:\d+ failed: the server offers no TLS version >= 1\.2 "
        r"\(tls\.min_version; TLS 1\.0 and 1\.1 are never used\)",
        69,
    ),
}


def test_every_tls_fault_has_a_case() -> None:
    assert set(TLS_FAULTS) <= set(CASES)


@pytest.fixture
def device(tmp_path: Path, swtpm: Swtpm) -> Iterator[Device]:
    with EstServer(tmp_path / "est", EstOptions()) as est:
        yield Device(tmp_path, swtpm, est)


def expect(device: Device, case: Case, *command: str) -> None:
    before = snapshot(device.state_dir)
    for name, value in case.server.items():
        setattr(device.est.options, name, value)
    deadline = sum(
        case.config.get(k, 0) for k in ("read_timeout_seconds", "connect_timeout_seconds")
    )
    result = device.run(*command, timeout=deadline + MARGIN_SECONDS)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert re.search(case.message, lines[0]), lines[0]
    assert result.code == case.code, result.err
    assert snapshot(device.state_dir) == before


@pytest.mark.parametrize("fault", CASES)
def test_enroll_fails_in_one_line_in_time_and_leaves_the_store(device: Device, fault: str) -> None:
    device.configure(**CASES[fault].config)
    expect(device, CASES[fault], "enroll")
    assert not (device.state_dir / "identity").exists() or not any(
        (device.state_dir / "identity").iterdir()
    )


@pytest.mark.parametrize("fault", CASES)
def test_renew_fails_in_one_line_in_time_and_leaves_the_store(device: Device, fault: str) -> None:
    first = device.run("enroll")
    assert first.code == 0, first.err
    device.configure(**CASES[fault].config)
    expect(device, CASES[fault], "renew")


def test_an_interrupt_ends_a_hanging_request_at_once_then_no_connection_is_made(
    tmp_path: Path,
) -> None:
    """The service's stop (agent/daemon.py trips the latch in its SIGTERM handler): a request
    the server holds ends without waiting for the read timeout, and nothing more is sent."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "gw-0001")]))
        .sign(key, hashes.SHA256())
    )
    body = base64.b64encode(csr.public_bytes(serialization.Encoding.DER))
    interrupt = Interrupt()
    try:
        with EstServer(tmp_path / "est", EstOptions(fault="hang", hang_seconds=600)) as est:
            transport = HttpsTransport(
                url=est.url, ca_file=est.ca_file, read_timeout_seconds=300, interrupt=interrupt
            )

            def trip_once_hanging() -> None:
                if est.hang_started.wait(60):
                    interrupt.trip()

            tripper = threading.Thread(target=trip_once_hanging)
            tripper.start()
            path = "/.well-known/est/simpleenroll"
            with (
                transport.connect() as conn,
                pytest.raises(Interrupted, match=r"interrupted: the service is stopping$"),
            ):
                conn.request(
                    "POST", path, headers={"Content-Type": "application/pkcs10"}, body=body
                )
            tripper.join()
            connections = est.connections
            with (
                pytest.raises(Interrupted, match=r"^connecting to EST server localhost:"),
                transport.connect(),
            ):
                pass
            assert est.connections == connections
            interrupt.trip()  # again: still tripped, no error
            assert interrupt.is_set()
    finally:
        interrupt.close()
