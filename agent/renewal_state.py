"""The scheduler's memory across restarts: one small, versioned JSON file, written atomically.

An attempt is recorded *before* the network is used (`record_attempt` counts it as a failure,
"interrupted"), so a crash or a kill in the middle counts as a failed attempt: a restart then
backs off instead of storming the server, and never forgets a 202's Retry-After. A success
resets the count; a failure keeps it and records why (one line, its disposition).

The file also keeps what the clock floor needs: the newest notBefore seen and when the state was
last written (agent/renewal.py does not believe a clock earlier than either).

The transitions (`record_*`, `clock_floor`) and the encoding are pure; `SchedulerStateStore` is
the thin I/O around a `FileStore`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from agent.errors import StorageError
from agent.renewal import Failure, History
from hal.interfaces import FileStore

STATE_FILE = "renewal-state.json"
STATE_FORMAT = 1
MAX_STATE_BYTES = 64 * 1024
MAX_ERROR_CHARS = 500
_TIME = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class SchedulerState:
    history: History = History()
    last_success: datetime | None = None
    #: the last failure's one-line message and its disposition (errors.classify), if any
    last_error: str | None = None
    last_disposition: str | None = None
    #: the newest notBefore of any certificate this device held, for the clock floor
    newest_not_before: datetime | None = None
    #: when this state was last saved, for the clock floor
    written_at: datetime | None = None


def record_attempt(state: SchedulerState, now: datetime) -> SchedulerState:
    """Before any network use: count the attempt as failed until it is known to have worked."""
    history = replace(
        state.history,
        failures=state.history.failures + 1,
        last_failure=Failure.RETRYABLE,
        last_attempt=now,
    )
    return replace(
        state,
        history=history,
        last_error="interrupted: the agent stopped during the attempt",
        last_disposition="interrupted",
    )


def record_success(state: SchedulerState, now: datetime, not_before: datetime) -> SchedulerState:
    newest = max(filter(None, (state.newest_not_before, not_before)))
    return SchedulerState(
        history=History(last_attempt=state.history.last_attempt),
        last_success=now,
        newest_not_before=newest,
        written_at=state.written_at,
    )


def record_failure(
    state: SchedulerState,
    *,
    failure: Failure,
    message: str,
    disposition: str,
    retry_after_until: datetime | None = None,
) -> SchedulerState:
    """After `record_attempt`: the attempt is already counted; say why it failed."""
    history = replace(state.history, last_failure=failure, retry_after_until=retry_after_until)
    return replace(
        state,
        history=history,
        last_error=" ".join(message.split())[:MAX_ERROR_CHARS],
        last_disposition=disposition,
    )


def clock_floor(state: SchedulerState, build_time: datetime) -> datetime:
    """The earliest moment the clock may claim: the newest of the build time, the newest
    notBefore seen and the last state write."""
    return max(t for t in (build_time, state.newest_not_before, state.written_at) if t is not None)


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(timezone.utc).strftime(_TIME)


def encode_state(state: SchedulerState) -> bytes:
    h = state.history
    table = {
        "format": STATE_FORMAT,
        "failures": h.failures,
        "last_failure": None if h.last_failure is None else h.last_failure.value,
        "last_attempt": _time(h.last_attempt),
        "retry_after_until": _time(h.retry_after_until),
        "last_success": _time(state.last_success),
        "last_error": state.last_error,
        "last_disposition": state.last_disposition,
        "newest_not_before": _time(state.newest_not_before),
        "written_at": _time(state.written_at),
    }
    return json.dumps(table, indent=2, sort_keys=True).encode() + b"\n"


def parse_state(data: bytes, where: str) -> SchedulerState:
    """The state in `data`; anything but exactly what `encode_state` writes is refused."""
    try:
        table = json.loads(data)
        if not isinstance(table, dict):
            raise ValueError("not a JSON object")
        if table.get("format") != STATE_FORMAT:
            raise ValueError(f"format {table.get('format')!r}, want {STATE_FORMAT}")
        expected = set(json.loads(encode_state(SchedulerState())))
        if set(table) != expected:
            raise ValueError(f"keys {sorted(set(table) ^ expected)} unexpected or missing")
        failures = table["failures"]
        if type(failures) is not int or not 0 <= failures <= 10**6:
            raise ValueError(f"failures {failures!r}")
        history = History(
            failures=failures,
            last_failure=None if table["last_failure"] is None else Failure(table["last_failure"]),
            last_attempt=_parse_time(table, "last_attempt"),
            retry_after_until=_parse_time(table, "retry_after_until"),
        )
        return SchedulerState(
            history=history,
            last_success=_parse_time(table, "last_success"),
            last_error=_optional_text(table, "last_error"),
            last_disposition=_optional_text(table, "last_disposition"),
            newest_not_before=_parse_time(table, "newest_not_before"),
            written_at=_parse_time(table, "written_at"),
        )
    except (ValueError, RecursionError) as e:
        raise StorageError(f"scheduler state {where} is corrupt: {e}") from e


def _parse_time(table: dict[str, Any], key: str) -> datetime | None:
    value = table[key]
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != 20:
        raise ValueError(f"{key} {value!r}")
    return datetime.strptime(value, _TIME).replace(tzinfo=timezone.utc)


def _optional_text(table: dict[str, Any], key: str) -> str | None:
    value = table[key]
    if value is not None and (not isinstance(value, str) or len(value) > MAX_ERROR_CHARS):
        raise ValueError(f"{key} is not a short string")
    return value


class SchedulerStateStore:
    """Load and save the state in `store` (the service's state directory)."""

    def __init__(self, *, store: FileStore) -> None:
        self.store = store

    def load(self) -> SchedulerState:
        data = self.store.read(STATE_FILE, limit=MAX_STATE_BYTES)
        if data is None:
            return SchedulerState()
        return parse_state(data, str(self.store.path(STATE_FILE)))

    def save(self, state: SchedulerState, now: datetime) -> SchedulerState:
        saved = replace(state, written_at=max(filter(None, (state.written_at, now))))
        self.store.write(STATE_FILE, encode_state(saved))
        return saved
