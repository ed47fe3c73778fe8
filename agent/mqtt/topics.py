"""Topic names of one device (pure): <prefix>/<device>/status, events, commands, responses."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Topics"]


@dataclass(frozen=True)
class Topics:
    prefix: str
    device: str

    def __post_init__(self) -> None:
        for what, value in (("topic prefix", self.prefix), ("device id", self.device)):
            if not value or any(ch in value for ch in "+#\x00"):
                raise ValueError(f"{what} {value!r} cannot be part of an MQTT topic")
        if "/" in self.device:
            raise ValueError(f"device id {self.device!r} cannot be one MQTT topic level")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def commands(self) -> str:
        return f"{self.base}/commands"

    @property
    def responses(self) -> str:
        return f"{self.base}/commands/response"
