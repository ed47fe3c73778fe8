"""The firmware status model: one value, rendered as text for people and JSON for machines."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from agent.errors import StorageError


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
