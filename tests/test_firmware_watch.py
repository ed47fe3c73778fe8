"""Firmware news for the service (agent/firmware_watch.py): installs, commits and rollbacks made
by root's one-shot commands become events, on a real rig (file slots, a real U-Boot environment
through fw_setenv, RAUC's boot logic); the last reading survives a restart of the service."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from agent import wiring
from agent.clock import Clock
from agent.components import Event, EventKind, Snapshot
from agent.config import load_config
from agent.firmware_watch import FirmwareWatch
from tests.support.firmware import Rig, cli, image, make_bundle


class Later(Clock):
    """Each reading a minute after the last: every turn is due."""

    def __init__(self) -> None:
        self._now = datetime(2026, 12, 1, tzinfo=timezone.utc)

    def now(self) -> datetime:
        self._now += timedelta(minutes=1)
        return self._now


class Host:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def snapshot(self) -> Snapshot:
        raise AssertionError("not asked")

    def request_renewal(self) -> None:
        raise AssertionError("not asked")

    def request_reload(self) -> None:
        raise AssertionError("not asked")


def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path / "dev", bootloader="uboot")
    with r.config.open("a") as f:
        f.write(f'[paths]\nstate_dir = "{tmp_path / "service"}"\n')
    return r


def watching(r: Rig, host: Host) -> FirmwareWatch:
    watch = wiring.firmware_watch(load_config(r.config), clock=Later())
    assert isinstance(watch, FirmwareWatch)
    watch.start(host)
    return watch


def look(watch: FirmwareWatch) -> None:
    due = watch.next_turn()
    assert due is not None
    watch.turn(due + timedelta(seconds=1), (), ())


def install(r: Rig, version: str, security_version: int, seed: int) -> None:
    data = make_bundle(image(40 * 1024, seed=seed), [r.vendor.signer], version=version,
                       security_version=security_version)  # fmt: skip
    assert cli(r.config, "install", str(r.write_bundle(data)))[0] == 0


def test_an_install_and_its_commit_are_events(tmp_path: Path) -> None:
    r, host = rig(tmp_path), Host()
    assert cli(r.config, "commit")[0] == 0
    watch = watching(r, host)
    look(watch)  # the baseline
    assert host.events == []
    install(r, "2.0", 2, 2)
    look(watch)
    look(watch)  # nothing new: nothing again
    assert [(e.kind, dict(e.detail)) for e in host.events] == [
        (EventKind.FIRMWARE_INSTALLED, {"slot": "B", "version": "2.0", "security_version": 2}),
    ]
    assert r.reboot() == "B"
    assert cli(r.config, "commit")[0] == 0
    look(watch)
    assert host.events[-1].kind == EventKind.FIRMWARE_COMMITTED
    assert dict(host.events[-1].detail) == {
        "slot": "B", "version": "2.0", "security_version": 2, "committed_security_version": 2,
    }  # fmt: skip
    assert watch.status()["committed_security_version"] == 2


def test_a_commit_made_before_the_service_started_is_still_reported_once(tmp_path: Path) -> None:
    r, host = rig(tmp_path), Host()
    assert cli(r.config, "commit")[0] == 0
    watch = watching(r, host)
    look(watch)
    install(r, "2.0", 2, 2)
    look(watch)
    watch.stop()  # the service stops for the reboot; the mark-good unit commits before it starts
    assert r.reboot() == "B"
    assert cli(r.config, "commit")[0] == 0
    after = Host()
    again = watching(r, after)
    look(again)
    look(again)
    assert [e.kind for e in after.events] == [EventKind.FIRMWARE_COMMITTED]


def test_a_rollback_by_the_bootloader_is_an_event_and_not_a_commit(tmp_path: Path) -> None:
    r, host = rig(tmp_path), Host()
    assert cli(r.config, "commit")[0] == 0
    watch = watching(r, host)
    look(watch)
    install(r, "2.0", 2, 2)
    look(watch)
    for _ in range(3):  # the new image boots but never commits
        assert r.reboot() == "B"
    assert r.reboot() == "A"  # the bootloader gives up on B
    look(watch)
    assert cli(r.config, "commit")[0] == 0  # the old slot confirmed: still no commit event
    look(watch)
    assert [(e.kind, dict(e.detail)) for e in host.events][1:] == [
        (EventKind.FIRMWARE_ROLLED_BACK, {"booted": "A", "failed": "B"}),
    ]


def test_an_unreadable_status_is_reported_once_and_watching_goes_on(tmp_path: Path) -> None:
    r, host = rig(tmp_path), Host()
    watch = watching(r, host)
    r.fw_env_config.write_text("garbage\n")  # the bootloader environment cannot be read
    look(watch)
    look(watch)
    assert host.events == [] and watch.status()["error"]
