"""The firmware status model: one value, rendered as text for people and JSON for machines.

`status_of` makes it from what the device reads (pure): `FirmwareDevice.status()` and the light
reader `agent.wiring.firmware_status` (which need not import the install machinery) share it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from agent.errors import BootControlError, StorageError

if TYPE_CHECKING:
    from agent.firmware.state import FirmwareState
    from hal.interfaces import BootState, MonotonicCounter

#: root's record of the slots, in `firmware.state_dir`
STATE_FILE = "state.json"


@dataclass(frozen=True)
class SlotStatus:
    name: str
    path: str
    booted: bool
    #: "good", "installed", "writing", "failed", "unknown" (no record: e.g. a factory image), or
    #: "bad": the bootloader will not boot it (out of the boot order or no tries left), which
    #: wins over any record
    state: str
    #: the bootloader's verdict as `rauc status` shows it ("good" = in the order, tries left)
    bootable: bool
    version: str
    security_version: int | None
    tries_left: int
    digest: str


@dataclass(frozen=True)
class FirmwareStatus:
    booted: str
    next_boot: str | None
    bootloader: str
    slots: tuple[SlotStatus, ...]
    committed_security_version: int
    counter: str
    counter_hardware_backed: bool
    pending: str | None
    #: the bootloader gave up on a new slot and booted the old one
    fell_back: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        backing = "" if self.counter_hardware_backed else ", NOT hardware-backed"
        lines = [
            f"booted slot:        {self.booted}",
            f"next boot:          {self.next_boot or 'none (no bootable slot)'}",
            f"bootloader:         {self.bootloader}",
            f"committed security version: {self.committed_security_version} "
            f"({self.counter} counter{backing})",
            f"pending install:    {self.pending or 'none'}",
            f"last boot fell back: {'yes' if self.fell_back else 'no'}",
        ]
        for s in self.slots:
            sv = "-" if s.security_version is None else str(s.security_version)
            mark = "*" if s.booted else " "
            lines.append(
                f"{mark} slot {s.name}: {s.state:<9} version {s.version} security_version {sv} "
                f"tries left {s.tries_left} ({s.path})"
            )
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, table: object, *, where: str) -> FirmwareStatus:
        """The inverse of `to_dict`, for the snapshot root leaves: every field checked."""
        try:
            if not isinstance(table, dict):
                raise ValueError("not a JSON object")
            slots = tuple(_typed(SlotStatus, slot) for slot in table["slots"])
            status: FirmwareStatus = _typed(cls, {**table, "slots": ()}, slots=slots)
            return status
        except (KeyError, TypeError, ValueError) as e:
            raise StorageError(f"firmware status snapshot {where} is malformed: {e}") from e


_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "str | None": (str, type(None)),
    "bool": (bool,),
    "int": (int,),
    "int | None": (int, type(None)),
}


def _typed(cls: type[Any], table: object, **given: Any) -> Any:
    if not isinstance(table, dict):
        raise ValueError(f"{cls.__name__}: not a JSON object")
    values = {}
    for f in fields(cls):
        if f.name in given:
            values[f.name] = given[f.name]
            continue
        value = table[f.name]
        allowed = _TYPES[str(f.type)]
        # bool is an int subclass: an int field must not take true/false, and vice versa
        if type(value) not in allowed:
            raise ValueError(f"{cls.__name__}.{f.name}: {value!r}")
        values[f.name] = value
    return cls(**values)


def verdict(recorded: str, bootable: bool) -> str:
    """A slot's state: our record, unless the bootloader says it will not boot it (RAUC's
    `mark-bad`, tries used up): then "bad", whatever we recorded. "writing" and "failed" are
    already not bootable and say more."""
    if not bootable and recorded in ("good", "installed", "unknown"):
        return "bad"
    return recorded


def status_of(
    *,
    booted: str,
    boot_state: BootState,
    bootloader: str,
    state: FirmwareState,
    slot_paths: Mapping[str, str],
    counter: MonotonicCounter,
) -> FirmwareStatus:
    """The status from the booted slot, the bootloader's state, root's records and the counter."""
    if booted not in slot_paths:
        raise BootControlError(
            f"booted slot {booted!r} is not a configured slot ({', '.join(slot_paths)})"
        )
    pending = state.pending
    fell_back = state.fell_back_from is not None or (
        pending is not None and pending != booted and not boot_state.bootable(pending)
    )
    slots = []
    for name, path in slot_paths.items():
        record = state.slots.get(name)
        bootable = boot_state.bootable(name)
        recorded = record.state if record else "unknown"
        slots.append(
            SlotStatus(
                name=name,
                path=path,
                booted=name == booted,
                state=verdict(recorded, bootable),
                bootable=bootable,
                version=record.version if record else "unknown",
                security_version=record.security_version if record else None,
                tries_left=boot_state.tries_left.get(name, 0),
                digest=record.digest if record else "",
            )
        )
    return FirmwareStatus(
        booted=booted,
        next_boot=boot_state.next_boot(),
        bootloader=bootloader,
        slots=tuple(slots),
        committed_security_version=counter.read(),
        counter=counter.kind,
        counter_hardware_backed=counter.hardware_backed,
        pending=pending,
        fell_back=fell_back,
    )
