"""One composition root: `agent/wiring.py` picks every implementation; the enroller, the
firmware device and the status collector take their collaborators keyword-only and build none
of them; status collection works from whatever stores it is given."""

from __future__ import annotations

import inspect
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agent import wiring
from agent.clock import ManualClock
from agent.config import parse_config
from agent.enroll import Enroller
from agent.errors import BootControlError, StorageError
from agent.est.pending import PendingRequest
from agent.firmware.device import FirmwareDevice
from agent.identity import Identity
from agent.status import StatusCollector
from hal.disk import FileStorage, FlockLock
from hal.softkeys import SoftwareKeyStore
from tests.conftest import ROOT

T0 = datetime(2026, 5, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize("cls", [Enroller, FirmwareDevice, StatusCollector])
def test_collaborators_are_keyword_only(cls: type) -> None:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # type: ignore[misc]
    assert params and all(p.kind is p.KEYWORD_ONLY for p in params), cls


def test_the_enroller_builds_none_of_its_collaborators() -> None:
    params = inspect.signature(Enroller.__init__).parameters
    required = {n for n, p in params.items() if n != "self" and p.default is p.empty}
    assert {"key_store", "clock", "store", "pending", "transport_factory", "tls_setup",
            "credentials"} <= required  # fmt: skip


def test_firmware_wiring_lives_in_the_one_root() -> None:
    assert not (ROOT / "agent" / "firmware" / "wiring.py").exists()


def test_wiring_enroller_takes_overrides_and_refuses_unknown_ones(tmp_path: Path) -> None:
    config = parse_config(
        f'[device]\nid = "gw-1"\n[paths]\nstate_dir = "{tmp_path}"\n[keys]\nstore = "software"\n'
        '[est]\nurl = "https://est.example"\n'
    )
    clock = ManualClock(T0)
    enroller = wiring.enroller(config, clock=clock, key_store=SoftwareKeyStore())
    assert enroller.store.state_dir == tmp_path
    with pytest.raises(TypeError, match="unknown collaborators"):
        wiring.enroller(config, transport=None)


class _Identities:
    def __init__(self, result: Identity | Exception | None) -> None:
        self.result = result

    def current(self) -> Identity | None:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


class _Pending:
    def load(self) -> PendingRequest | None:
        return None


class _Firmware:
    def to_dict(self) -> Any:
        raise BootControlError("bootenv: corrupt (CRC mismatch)")


def collector(identities: _Identities, firmware: Any = None) -> StatusCollector:
    return StatusCollector(
        device_id="gw-1",
        config_source="/etc/devid-agent/config.toml",
        identities=identities,
        pending=_Pending(),
        firmware=firmware,
        clock=ManualClock(T0),
        skew=timedelta(seconds=300),
    )


def test_status_collection_reports_what_it_cannot_read() -> None:
    status = collector(_Identities(StorageError("identity/current: dangling")), _Firmware).collect()
    assert status.identity.state == "unreadable"
    assert status.errors == ("identity/current: dangling", "bootenv: corrupt (CRC mismatch)")
    assert not status.healthy


def test_status_collection_not_enrolled_and_no_firmware() -> None:
    status = collector(_Identities(None)).collect()
    assert status.identity.state == "none" and status.firmware is None and status.errors == ()


def test_a_real_store_through_the_root(tmp_path: Path) -> None:
    config = parse_config(f'[device]\nid = "gw-1"\n[paths]\nstate_dir = "{tmp_path}"\n')
    status = wiring.status_collector(config, clock=ManualClock(T0)).collect()
    assert status.identity.state == "none" and status.errors == ()
    assert isinstance(wiring.storage(), FileStorage) and isinstance(wiring.lock(), FlockLock)
