"""The firmware status model: one value, rendered as text for people and JSON for machines."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


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
