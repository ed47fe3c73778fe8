"""Per-slot firmware records, kept in one small JSON file written atomically.

The bootloader knows which slot boots next and how many tries are left; this file knows what
is *in* each slot (version, security version, digest) and what the agent did last (a pending
install, a fallback). Slot states:

    writing    an install began writing the slot and has not finished (or was cut off)
    installed  written, verified and set as next boot; waiting for `firmware commit`
    good       booted and committed
    failed     the bootloader fell back from it, or its install failed
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.errors import StorageError

STATE_FORMAT = 1
SLOT_STATES = ("writing", "installed", "good", "failed")
MAX_STATE_BYTES = 64 * 1024


@dataclass(frozen=True)
class SlotRecord:
    state: str
    version: str = "unknown"
    security_version: int = 0
    hash_algorithm: str = ""
    digest: str = ""
    size: int = 0
    #: ISO 8601 UTC time of the last change
    updated: str = ""


_FIELD_TYPES = {
    "state": str,
    "version": str,
    "security_version": int,
    "hash_algorithm": str,
    "digest": str,
    "size": int,
    "updated": str,
}


@dataclass(frozen=True)
class FirmwareState:
    slots: dict[str, SlotRecord] = field(default_factory=dict)
    #: the slot installed and set as next boot, not yet committed
    pending: str | None = None
    #: the slot the bootloader fell back from at the last commit (cleared by the next install)
    fell_back_from: str | None = None

    def with_slot(self, name: str, record: SlotRecord, **changes: Any) -> FirmwareState:
        return replace(self, slots={**self.slots, name: record}, **changes)


def _corrupt(path: Path, what: str) -> StorageError:
    # `what` may quote the file (a key name in a TypeError): control characters escaped, so
    # the message stays one line
    what = re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", what)
    return StorageError(f"firmware state file {path} is corrupt: {what}")


def parse_state(data: bytes | None, path: Path) -> FirmwareState:
    """The state in `data` (None: no file yet); `path` names it in errors."""
    if data is None:
        return FirmwareState()
    try:
        table = json.loads(data)
        if not isinstance(table, dict):
            raise _corrupt(path, "not a JSON object")
        if table.get("format") != STATE_FORMAT:
            raise _corrupt(path, f"format {table.get('format')!r}")
        slots = {}
        for name, record in table["slots"].items():
            slot = SlotRecord(**record)
            if slot.state not in SLOT_STATES:
                raise _corrupt(path, f"slot {name} state {slot.state!r}")
            for key, value in asdict(slot).items():
                if type(value) is not _FIELD_TYPES[key]:
                    raise _corrupt(path, f"slot {name} {key} {value!r}")
            slots[name] = slot
        for key in ("pending", "fell_back_from"):
            if table[key] is not None and table[key] not in slots:
                raise _corrupt(path, f"{key} {table[key]!r} names no recorded slot")
        return FirmwareState(
            slots=slots, pending=table["pending"], fell_back_from=table["fell_back_from"]
        )
    except StorageError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise _corrupt(path, str(e)) from e


def encode_state(state: FirmwareState) -> bytes:
    table = {
        "format": STATE_FORMAT,
        "slots": {name: asdict(record) for name, record in sorted(state.slots.items())},
        "pending": state.pending,
        "fell_back_from": state.fell_back_from,
    }
    return json.dumps(table, indent=2, sort_keys=True).encode() + b"\n"
