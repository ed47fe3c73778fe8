"""The CA refresh component (agent/ca_service.py) in-process, with the service's own wiring and
our real HTTPS EST server: what it stores, emits and reports through `status()`.

The schedule and the judging are agent/ca_refresh.py's (tests/test_ca_refresh.py); the real
service process is tests/test_daemon_ca_refresh.py."""

from __future__ import annotations

import errno
import os
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pytest_mock import MockerFixture

import hal.storage
from agent.ca_service import CaRefresher
from agent.clock import SystemClock
from agent.components import Event, EventKind, Snapshot
from agent.config import Config, load_config
from agent.wiring import ca_refresher, ca_source, enroller
from tests.support.ca import pem
from tests.support.enroll_env import write_config
from tests.support.est_server import EstServer
from tests.test_disk_faults import CALLS, faults, temp_files


class Host:
    """The daemon as the component sees it: events kept, nothing else asked."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def snapshot(self) -> Snapshot:
        raise AssertionError("the CA refresh does not ask for a snapshot")

    def request_renewal(self) -> None:
        raise AssertionError("not asked")

    def request_reload(self) -> None:
        raise AssertionError("not asked")

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


def _config(tmp_path: Path, est: EstServer, **est_keys: object) -> Config:
    path = tmp_path / "config.toml"
    write_config(path, state_dir=tmp_path / "state", est=est, store="software",
                 cacerts_refresh_seconds=3600, **est_keys)  # fmt: skip
    with path.open("a") as f:
        f.write("[renewal]\nretry_min_seconds = 10\nretry_max_seconds = 40\n")
    return load_config(path)


def _refresher(config: Config) -> tuple[CaRefresher, Host]:
    component = ca_refresher(config, ca_source(config))
    assert isinstance(component, CaRefresher)
    host = Host()
    component.start(host)
    return component, host


def _now() -> datetime:
    return SystemClock().now()


def test_same_set_then_a_rollover_stored_and_reported(tmp_path: Path, est: EstServer) -> None:
    config = _config(tmp_path, est)
    refresher, host = _refresher(config)
    status = refresher.status()
    assert status["enabled"] is True and status["last_refresh"] is None
    refresher.refresh(_now())
    assert host.events[-1].detail["result"] == "skipped"  # nothing stored: enrollment fetches
    assert est.records == []
    enroller(config).enroll()
    refresher.on_event(Event(kind=EventKind.ENROLLED, at=_now()))
    next_at = datetime.fromisoformat(str(refresher.status()["next_refresh"]).replace("Z", "+00:00"))
    assert _now() - timedelta(seconds=2) < next_at <= _now() + timedelta(hours=1)
    host.events.clear()
    refresher.refresh(_now())
    assert host.kinds() == [EventKind.CA_REFRESHED] and host.events[0].detail["result"] == "same"
    state = config.paths.state_dir
    before = (state / "cacerts.pem").read_bytes()

    new_root, _, _ = est.rollover()
    host.events.clear()
    refresher.refresh(_now())
    assert host.kinds() == [EventKind.CA_CHANGED, EventKind.CA_REFRESHED]
    changed = host.events[0].detail
    assert changed["new_roots"] == 1 and changed["certificates"] == 4
    assert changed["old_sha256"] == status_sha(before)
    assert pem(new_root) in (state / "cacerts.pem").read_bytes()
    status = refresher.status()
    assert status["last_result"] == "changed" and status["last_error"] is None
    assert status["ca_set_sha256"] == changed["new_sha256"]
    # the enroller uses the stored set from now on: it remembers it as this server's
    assert f'"cacerts_sha256": "{changed["new_sha256"]}"' in (state / "est-server.json").read_text()


def status_sha(pem_bytes: bytes) -> str:
    from cryptography import x509

    from agent.est.memory import ca_set_sha256

    return ca_set_sha256(x509.load_pem_x509_certificates(pem_bytes))


def test_a_request_event_refreshes_at_the_next_turn(tmp_path: Path, est: EstServer) -> None:
    config = _config(tmp_path, est)
    enroller(config).enroll()
    refresher, host = _refresher(config)
    refresher.on_event(Event(kind=EventKind.CACERTS_REFRESH_REQUESTED, at=_now()))
    due = refresher.next_turn()
    assert due is not None and due <= _now()
    refresher.turn(_now(), (), ())
    assert host.events[-1].kind == EventKind.CA_REFRESHED
    assert host.events[-1].detail["requested"] is True
    assert refresher.next_turn() is not None and refresher.next_turn() > _now()  # type: ignore[operator]


def test_a_failing_refresh_backs_off_and_status_shows_the_error(
    tmp_path: Path, est: EstServer
) -> None:
    config = _config(tmp_path, est)
    enroller(config).enroll()
    refresher, host = _refresher(config)
    refresher.refresh(_now())
    before = (config.paths.state_dir / "cacerts.pem").read_bytes()
    est.stop()
    for failures in (1, 2):
        at = _now()
        refresher.refresh(at)
        status = refresher.status()
        assert status["consecutive_failures"] == failures
        assert status["last_result"] == "failed"
        assert "localhost" in str(status["last_error"]) or "refused" in str(status["last_error"])
        next_at = datetime.fromisoformat(str(status["next_refresh"]).replace("Z", "+00:00"))
        wait = (next_at - at).total_seconds()
        assert 9 <= wait <= 10 * 2 ** (failures - 1) + 1  # full jitter within the doubling cap
    assert host.events[-1].detail["result"] == "failed"
    assert (config.paths.state_dir / "cacerts.pem").read_bytes() == before


def test_without_an_anchor_yet_nothing_is_fetched(tmp_path: Path, est: EstServer) -> None:
    """Before a fingerprint bootstrap stored an anchor, a refresh never trusts on first use."""
    config = _config(
        tmp_path, est, trust_anchor=None, bootstrap_fingerprint_sha256=est.ca_fingerprint
    )
    refresher, host = _refresher(config)
    refresher.refresh(_now())
    assert host.events[-1].detail["result"] == "skipped"
    assert est.records == [] and not (config.paths.state_dir / "cacerts.pem").exists()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO], ids=errno.errorcode.get)
@pytest.mark.parametrize("name", CALLS)
def test_a_disk_fault_while_storing_a_changed_set_keeps_a_whole_one(
    mocker: MockerFixture, tmp_path: Path, est: EstServer, name: str, err: int
) -> None:
    """hal.storage fails at every write, fsync and rename of the adoption in turn: the refresh
    reports it, `cacerts.pem` is the old set or the new one, whole, and the next refresh (a
    healthy disk) stores the new set and the memory that goes with it."""
    config = _config(tmp_path, est)
    enroller(config).enroll()
    refresher, _host = _refresher(config)
    cacerts = config.paths.state_dir / "cacerts.pem"
    old = cacerts.read_bytes()
    est.rollover()
    new = status_sha(b"".join(pem(c) for c in est.cacerts()))  # the set, in any order
    injected = 0
    for fake in faults(mocker, hal.storage, name, err):
        refresher.refresh(_now())
        status = refresher.status()
        # "same": a directory fsync failed after the rename, so the new set was in place
        if status["last_result"] in ("changed", "same"):
            assert not fake.fired, fake.log
            break
        injected += 1
        assert status["last_result"] == "failed" and os.strerror(err) in str(status["last_error"])
        assert status_sha(cacerts.read_bytes()) in (status_sha(old), new)
        assert temp_files(config.paths.state_dir) == []
    assert injected >= 1
    assert status_sha(cacerts.read_bytes()) == new
    refresher.refresh(_now())
    assert refresher.status()["last_result"] == "same"
    assert new in (config.paths.state_dir / "est-server.json").read_text()
