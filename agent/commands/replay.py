"""The replay memory: every accepted command id, kept until the command expires, in one small
versioned file written atomically (the transitions and the encoding pure; `ReplayMemory` the
thin I/O around a `FileStore`, like agent.renewal_state).

- An id is remembered *before* the command is handed to the channel, so a command runs at most
  once even if the agent dies while running it.
- Ids are dropped once their command would be refused as expired anyway, so the memory never
  holds more than the commands of the last `max_lifetime` (+ skew); the count is bounded too,
  and a full memory refuses new commands (`busy`) rather than forget an unexpired id.
- A clock floor: the file keeps the latest time a command was accepted at, and expiry is judged
  at no earlier time. A device whose clock is set back (no RTC, a bad NTP answer) cannot be made
  to accept again a command whose id was already dropped. The floor is never later than a
  command's signed expires_at + skew (a command is accepted only before then), so a wrong
  clock in the future cannot push it past real time by more than one command's lifetime.
- A damaged file (anything but exactly what `encode_state` writes) is never reset: every
  command is refused (`state_damaged`) until an operator repairs it, because an empty memory
  would accept again every command of the last hour. docs/commands.md says how to repair.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from agent import bounded_json
from agent.commands.envelope import ID
from agent.commands.errors import CommandRefused
from agent.errors import StorageError
from hal.interfaces import FileStore

STATE_FILE = "command-replay.json"
LOCK_FILE = "command-replay.lock"
STATE_FORMAT = 1
DEFAULT_CAPACITY = 1024
MAX_CAPACITY = 10_000
#: one entry ["<id, 64 chars at most>","2026-12-01T12:00:00Z"], plus separators
_ENTRY_BYTES = 96
MAX_STATE_BYTES = 256 + MAX_CAPACITY * _ENTRY_BYTES
_TIME = "%Y-%m-%dT%H:%M:%SZ"


class ReplayStateDamaged(StorageError):
    """The replay memory file is not what this agent writes: repair it, never reset it."""


@dataclass(frozen=True)
class ReplayState:
    #: (expires_at, id), sorted
    entries: tuple[tuple[datetime, str], ...] = ()
    #: the latest time a command was accepted at (the clock floor), if any
    floor: datetime | None = None

    def ids(self) -> frozenset[str]:
        return frozenset(i for _, i in self.entries)


def judged_at(state: ReplayState, now: datetime) -> datetime:
    """The time expiry is judged at: never before the clock floor."""
    return now if state.floor is None or now >= state.floor else state.floor


def prune(state: ReplayState, now: datetime, skew: timedelta) -> ReplayState:
    """Drop the ids whose commands would now be refused as expired."""
    t = judged_at(state, now)
    kept = tuple(e for e in state.entries if t - skew < e[0])
    return ReplayState(entries=kept, floor=state.floor)


def admit(
    state: ReplayState,
    command_id: str,
    *,
    expires_at: datetime,
    now: datetime,
    skew: timedelta,
    capacity: int,
) -> ReplayState:
    """The state with `command_id` remembered, or CommandRefused (`expired` against the clock
    floor, `replayed`, `busy`)."""
    t = judged_at(state, now)
    if t - skew >= expires_at:
        raise CommandRefused(
            "expired",
            f"expired at {expires_at:{_TIME}}; this device already accepted a command at "
            f"{t:{_TIME}} (its clock was set back)",
            command_id=command_id,
        )
    state = prune(state, now, skew)
    if command_id in state.ids():
        raise CommandRefused(
            "replayed", "a command with this id was already accepted", command_id=command_id
        )
    if len(state.entries) >= capacity:
        first = state.entries[0][0]
        raise CommandRefused(
            "busy",
            f"the replay memory holds {len(state.entries)} unexpired ids (its capacity); the "
            f"next one expires at {first:{_TIME}}",
            command_id=command_id,
        )
    return ReplayState(
        entries=tuple(sorted((*state.entries, (expires_at, command_id)))),
        floor=max(t, now),
    )


def _time(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime(_TIME)


def encode_state(state: ReplayState) -> bytes:
    table = {
        "format": STATE_FORMAT,
        "floor": None if state.floor is None else _time(state.floor),
        "ids": [[i, _time(t)] for t, i in state.entries],
    }
    return json.dumps(table, separators=(",", ":")).encode() + b"\n"


def _parse_time(value: object, what: str) -> datetime:
    if not isinstance(value, str) or len(value) != 20:
        raise ValueError(f"{what} is not a time like 2026-12-01T12:00:00Z")
    return datetime.strptime(value, _TIME).replace(tzinfo=timezone.utc)


def parse_state(data: bytes, where: str) -> ReplayState:
    """The state in `data`; anything but exactly what `encode_state` writes is
    ReplayStateDamaged."""
    try:
        table = bounded_json.loads(data, max_depth=3)
        if not isinstance(table, dict):
            raise ValueError("not a JSON object")
        if table.get("format") != STATE_FORMAT or type(table.get("format")) is not int:
            raise ValueError(f"format {str(table.get('format'))[:20]!r}, want {STATE_FORMAT}")
        if set(table) != {"format", "floor", "ids"}:
            raise ValueError("keys are not format, floor, ids")
        floor = None if table["floor"] is None else _parse_time(table["floor"], "floor")
        ids = table["ids"]
        if not isinstance(ids, list) or len(ids) > MAX_CAPACITY:
            raise ValueError(f"ids is not a list of at most {MAX_CAPACITY} entries")
        entries: list[tuple[datetime, str]] = []
        for n, entry in enumerate(ids):
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
                raise ValueError(f"ids[{n}] is not [id, expires_at]")
            if not ID.match(entry[0]):
                raise ValueError(f"ids[{n}] is not a command id")
            entries.append((_parse_time(entry[1], f"ids[{n}] expires_at"), entry[0]))
        state = ReplayState(entries=tuple(sorted(entries)), floor=floor)
        if len(state.ids()) != len(entries):
            raise ValueError("an id is listed twice")
        if encode_state(state) != data:
            raise ValueError("not in the form this agent writes")
        return state
    except ValueError as e:
        message = " ".join(str(e).split())[:200]
        raise ReplayStateDamaged(f"command replay memory {where} is damaged: {message}") from e


class ReplayMemory:
    """The replay memory in `store` (the service's state directory), as verify_command's
    `replay`: each `admit` reads the file under its lock, decides, and writes it back."""

    def __init__(self, *, store: FileStore, capacity: int = DEFAULT_CAPACITY) -> None:
        if not 1 <= capacity <= MAX_CAPACITY:
            raise ValueError(f"capacity must be 1 to {MAX_CAPACITY}")
        self.store = store
        self.capacity = capacity

    def load(self) -> ReplayState:
        """The state on disk (empty when there is no file); StorageError when it is damaged or
        cannot be read."""
        data = self.store.read(STATE_FILE, limit=MAX_STATE_BYTES)
        if data is None:
            return ReplayState()
        return parse_state(data, str(self.store.path(STATE_FILE)))

    def admit(
        self, command_id: str, *, expires_at: datetime, now: datetime, skew: timedelta
    ) -> None:
        where = self.store.path(STATE_FILE)
        try:
            with self.store.lock(LOCK_FILE, holder="another command being admitted"):
                data = self.store.read(STATE_FILE, limit=MAX_STATE_BYTES)
                state = ReplayState() if data is None else parse_state(data, str(where))
                new = admit(
                    state,
                    command_id,
                    expires_at=expires_at,
                    now=now,
                    skew=skew,
                    capacity=self.capacity,
                )
                self.store.write(STATE_FILE, encode_state(new))
        except StorageError as e:
            damaged = isinstance(e, ReplayStateDamaged)
            raise CommandRefused(
                "state_damaged" if damaged else "state_unavailable",
                f"{e}; every command is refused until it is repaired (docs/commands.md)"
                if damaged
                else f"{e}; the command was not accepted",
                command_id=command_id,
            ) from e
