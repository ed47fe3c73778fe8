"""agent/renewal_state.py: the scheduler's state file, its transitions, and a restart."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.errors import StorageError
from agent.renewal import Action, CertFacts, Failure, RenewalPolicy, decide
from agent.renewal_state import (
    STATE_FILE,
    SchedulerState,
    SchedulerStateStore,
    clock_floor,
    encode_state,
    parse_state,
    record_attempt,
    record_failure,
    record_success,
)
from hal.secure_dir import DirStore

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
CERT = CertFacts(T0, T0 + timedelta(days=30), 7)


def store(tmp_path: Path) -> SchedulerStateStore:
    return SchedulerStateStore(store=DirStore(tmp_path / "state"))


def test_missing_state_is_the_empty_state(tmp_path: Path) -> None:
    assert store(tmp_path).load() == SchedulerState()
    assert not (tmp_path / "state").exists()


def test_an_interrupted_attempt_counts_as_a_failure_after_a_restart(tmp_path: Path) -> None:
    s = store(tmp_path)
    now = T0 + timedelta(days=18)
    s.save(record_attempt(SchedulerState(), now), now)  # then the process dies
    loaded = store(tmp_path).load()
    assert loaded.history.failures == 1 and loaded.history.last_attempt == now
    assert loaded.last_error == "interrupted: the agent stopped during the attempt"
    d = decide(cert=CERT, device_id="gw-1", history=loaded.history, now=now,
               clock_floor=clock_floor(loaded, T0), bootstrap_available=True,
               policy=RenewalPolicy())  # fmt: skip
    assert d.action is Action.RENEW and d.at >= now + timedelta(seconds=60)  # no storm
    assert (tmp_path / "state" / STATE_FILE).stat().st_mode & 0o777 == 0o600


def test_a_pending_retry_after_survives_a_restart_and_success_resets(tmp_path: Path) -> None:
    s = store(tmp_path)
    now = T0 + timedelta(days=18)
    asked = now + timedelta(hours=2)
    state = record_failure(record_attempt(SchedulerState(), now), failure=Failure.RETRYABLE,
                           message="HTTP 202\nRetry-After 7200", disposition="wait",
                           retry_after_until=asked)  # fmt: skip
    s.save(state, now)
    loaded = s.load()
    assert loaded.history.retry_after_until == asked
    assert loaded.last_error == "HTTP 202 Retry-After 7200"  # one line
    done = record_success(loaded, asked, not_before=asked - timedelta(seconds=60))
    assert done.history.failures == 0 and done.last_success == asked and done.last_error is None
    assert done.newest_not_before == asked - timedelta(seconds=60)


def test_the_clock_floor_is_the_newest_of_build_time_not_before_and_last_write(
    tmp_path: Path,
) -> None:
    build = T0 - timedelta(days=100)
    saved = store(tmp_path).save(SchedulerState(newest_not_before=T0), T0 + timedelta(days=1))
    assert clock_floor(saved, build) == T0 + timedelta(days=1)
    assert clock_floor(SchedulerState(), build) == build
    assert clock_floor(SchedulerState(newest_not_before=T0), build) == T0


@pytest.mark.parametrize(
    "damage",
    [
        b"",
        b"[]",
        b'{"format": 2}',
        b"{" * 5000,
        json.dumps({**json.loads(encode_state(SchedulerState())), "extra": 1}).encode(),
        json.dumps({**json.loads(encode_state(SchedulerState())), "failures": -1}).encode(),
        json.dumps({**json.loads(encode_state(SchedulerState())), "failures": True}).encode(),
        json.dumps({**json.loads(encode_state(SchedulerState())), "last_failure": "x"}).encode(),
        json.dumps({**json.loads(encode_state(SchedulerState())), "last_attempt": "1"}).encode(),
        json.dumps({**json.loads(encode_state(SchedulerState())), "last_error": 5}).encode(),
    ],
)
def test_a_corrupt_state_file_is_one_line_and_left_as_it_is(tmp_path: Path, damage: bytes) -> None:
    s = store(tmp_path)
    s.save(SchedulerState(), T0)
    path = tmp_path / "state" / STATE_FILE
    path.write_bytes(damage)
    with pytest.raises(StorageError, match=rf"^scheduler state {path} is corrupt: ") as e:
        s.load()
    assert "\n" not in str(e.value)
    assert path.read_bytes() == damage


def test_encoding_round_trips() -> None:
    state = SchedulerState(last_success=T0, last_error="x", last_disposition="retry",
                           newest_not_before=T0, written_at=T0)  # fmt: skip
    state = record_attempt(state, T0 + timedelta(hours=1))
    assert parse_state(encode_state(state), "here") == state
