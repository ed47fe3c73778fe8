"""Shared fixtures: a real swtpm, the tpm2 OpenSSL provider, a test CA."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.ca import TestCA
from tests.support.est_server import EstOptions, EstServer
from tests.support.swtpm import Swtpm

if TYPE_CHECKING:
    from tests.support.device import Device
    from tests.support.service import Notifications, Service

ROOT = Path(__file__).resolve().parent.parent


def provider_path() -> Path:
    """The tpm2 OpenSSL provider (>= 1.2) that `make setup` found or unpacked."""
    marker = ROOT / ".deps" / "tpm2-provider.path"
    if not marker.is_file():
        raise RuntimeError("no .deps/tpm2-provider.path: run `make setup` first")
    return Path(marker.read_text().strip()).resolve()


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    """A fresh software TPM on a free loopback port; stopped by PID at teardown."""
    tpm = Swtpm(tmp_path / "tpm-state").start()
    try:
        yield tpm
    finally:
        tpm.stop()


@pytest.fixture(scope="session")
def session_swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    """One software TPM for the whole session: the tpm2 provider can be loaded into a process
    only once, for one TCTI, so every TLS test with TPM keys shares this TPM."""
    tpm = Swtpm(tmp_path_factory.mktemp("session-tpm")).start()
    try:
        yield tpm
    finally:
        tpm.stop()


@pytest.fixture(scope="session")
def tpm2_provider(session_swtpm: Swtpm) -> Swtpm:
    """Load the tpm2 OpenSSL provider into this test process for `session_swtpm`."""
    from hal.openssl_provider import load_tpm2_provider

    load_tpm2_provider(str(provider_path()), tcti=session_swtpm.tcti)
    return session_swtpm


@pytest.fixture
def test_ca() -> TestCA:
    return TestCA()


@pytest.fixture
def est(tmp_path: Path) -> Iterator[EstServer]:
    """Our HTTPS EST server with default options on a free loopback port (a module may define
    its own `est` with other options)."""
    with EstServer(tmp_path / "est", EstOptions()) as server:
        yield server


@pytest.fixture
def device(tmp_path: Path, swtpm: Swtpm, est: EstServer) -> Device:
    """A device (tests/support/device.py) with its own swtpm, pointed at `est`."""
    from tests.support.device import Device

    return Device(tmp_path, swtpm, est)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[Notifications]:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET (tests/support/service.py)."""
    from tests.support.service import Notifications

    n = Notifications(tmp_path / "notify")
    yield n
    n.close()


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """Services a test starts (append them): any still running at the end is killed."""
    started: list[Service] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.stop(signal.SIGKILL)
