"""A `BootControl` over a key=value bootloader environment and a RAUC variable scheme.

A backend supplies I/O (`_read_env`, `_write_env`); a scheme turns the environment into a
`BootState` and computes the variables an operation changes. Every operation reads and
validates the whole environment before it writes anything, so a corrupt environment is
rejected and left exactly as it was.
"""

from __future__ import annotations

import abc
import logging
import re
import subprocess
from collections.abc import Mapping, Sequence

from hal import faults
from hal.errors import BootControlError
from hal.interfaces import BootState

log = logging.getLogger(__name__)

DEFAULT_SLOTS = ("A", "B")
TOOL_TIMEOUT_S = 30.0
#: the whole environment a bootloader tool gets: root runs these from OTA hooks, whose PATH,
#: locale and LD_* variables are the caller's, not ours (the tools themselves are absolute paths)
TOOL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
Env = Mapping[str, str]
_DECIMAL = re.compile(r"[0-9]{1,3}\Z")
_HEX = re.compile(r"[0-9a-fA-F]{1,4}\Z")
_BOOTNAME = re.compile(r"[A-Za-z0-9_.-]{1,32}\Z")


class Scheme(abc.ABC):
    """RAUC's variables for one bootloader. Pure: environment in, changes out."""

    def __init__(self, *, slots: Sequence[str] = DEFAULT_SLOTS, max_tries: int = 3) -> None:
        self.slots = tuple(slots)
        self.max_tries = max_tries

    @abc.abstractmethod
    def state(self, env: Env, where: str) -> BootState:
        """Raise BootControlError naming `where` if a variable holds something invalid."""

    @abc.abstractmethod
    def set_primary(self, env: Env, slot: str, tries: int) -> dict[str, str]: ...

    @abc.abstractmethod
    def mark_good(self, env: Env, slot: str) -> dict[str, str]: ...

    @abc.abstractmethod
    def mark_bad(self, env: Env, slot: str) -> dict[str, str]: ...

    def order(self, env: Env, key: str, where: str) -> tuple[str, ...]:
        """The boot order. Names that are not our slots (a recovery slot: "A B R") are kept
        where they are; a name twice, or one that is no boot name, is corrupt."""
        order = tuple(env.get(key, " ".join(self.slots)).split())
        if len(set(order)) != len(order) or not all(_BOOTNAME.match(name) for name in order):
            raise corrupt(where, f"{key}={env[key]!r} is not an order of slot names")
        return order

    def number(self, env: Env, key: str, default: int, where: str) -> int:
        text = env.get(key, str(default))
        if not _DECIMAL.match(text):
            raise corrupt(where, f"{key}={text!r} is not a small decimal number")
        return int(text)

    def hex_number(self, env: Env, key: str, default: int, where: str) -> int:
        """A count as RAUC and U-Boot read it: hexadecimal without "0x" (RAUC writes `%x`,
        its boot script tests `0x${BOOT_A_LEFT}`, U-Boot's setexpr counts down in hex). So
        RAUC 1.8's `mark-active` write of "12" for boot-attempts-primary=12 is 0x12 = 18 tries
        here too, as it is for RAUC and the bootloader."""
        text = env.get(key, format(default, "x"))
        if not _HEX.match(text):
            raise corrupt(where, f"{key}={text!r} is not a small hexadecimal number")
        return int(text, 16)


def corrupt(where: str, what: str) -> BootControlError:
    return BootControlError(f"bootloader environment {where} is corrupt: {what}")


def run_tool(
    args: Sequence[str], where: str, *, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a bootloader tool (an argument list: no shell; args[0] an absolute path, so no
    PATH lookup) on `where` with TOOL_ENV as its whole environment; a failure is one
    BootControlError line with the tool's last line of stderr."""
    if not args[0].startswith("/"):
        raise BootControlError(f"bootloader tool {args[0]!r} is not an absolute path")
    faults.point(f"{args[0]} {where}")
    try:
        done = subprocess.run(
            list(args),
            input=stdin,
            capture_output=True,
            # An env may hold any bytes in variables that are not ours (a splash image name in
            # Latin-1): decoding must not fail on them; ours are then checked character by
            # character, and a stray byte in one of them names that variable as corrupt.
            encoding="utf-8",
            errors="surrogateescape",
            timeout=TOOL_TIMEOUT_S,
            env=dict(TOOL_ENV),
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BootControlError(f"cannot run {args[0]} for {where}: {e}") from e
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise BootControlError(f"{args[0]} failed on {where}: {reason}")
    return done


class EnvBootControl(abc.ABC):
    kind: str

    def __init__(self, *, scheme: Scheme) -> None:
        self.scheme = scheme

    @property
    @abc.abstractmethod
    def where(self) -> str:
        """The environment's location, for messages."""

    @abc.abstractmethod
    def _read_env(self) -> dict[str, str]: ...

    @abc.abstractmethod
    def _write_env(self, changes: Mapping[str, str]) -> None: ...

    def _known_slot(self, slot: str) -> None:
        if slot not in self.scheme.slots:
            raise BootControlError(f"unknown slot {slot!r} (slots are {self.scheme.slots})")

    def state(self) -> BootState:
        return self.scheme.state(self._read_env(), self.where)

    def _apply(self, changes: Mapping[str, str]) -> None:
        self._write_env(changes)
        env = self._read_env()
        self.scheme.state(env, self.where)
        missed = {k: v for k, v in changes.items() if env.get(k) != v}
        if missed:
            raise BootControlError(f"bootloader environment {self.where} did not take {missed}")
        log.info("bootloader environment %s: set %s", self.where, dict(changes))

    def set_primary(self, slot: str, *, tries: int) -> None:
        self._known_slot(slot)
        env = self._read_env()
        self.scheme.state(env, self.where)
        self._apply(self.scheme.set_primary(env, slot, tries))

    def mark_good(self, slot: str) -> None:
        self._known_slot(slot)
        env = self._read_env()
        self.scheme.state(env, self.where)
        self._apply(self.scheme.mark_good(env, slot))

    def mark_bad(self, slot: str) -> None:
        self._known_slot(slot)
        env = self._read_env()
        self.scheme.state(env, self.where)
        self._apply(self.scheme.mark_bad(env, slot))


def parse_lines(text: str, where: str) -> dict[str, str]:
    """`name=value` lines. A name seen twice means a value spans lines (one holding "X=...")
    or the env is damaged: which line is the variable would be a guess, so it is corrupt."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if sep:
            if name in env:
                raise corrupt(where, f"{name} appears twice")
            env[name] = value
    return env
