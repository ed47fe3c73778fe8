"""Deterministic crash points, for the tests that cut the power at every step.

With `DEVID_AGENT_CRASH_AT=N` in the environment, the process ends at the N-th crash point it
passes, with `os._exit(CRASH_EXIT)`: no cleanup, no flush, as a power cut or a `kill -9` would
leave it (the page cache survives, which a real power cut would not: fsync ordering is what the
storage code promises, and it is tested by these points falling between each write, fsync and
rename). Crash points sit before and after every write, fsync and rename of hal.storage and
hal.secure_dir, at every chunk written to a slot, and before every bootloader tool runs. A test
runs an operation with N = 1, 2, ... until it completes without crashing (as Mender's
`Killed_in_<State>` cases do), checking after each crash what the docs promise.

Unset (always, outside tests), `point()` costs one comparison.
"""

from __future__ import annotations

import os

ENV = "DEVID_AGENT_CRASH_AT"
CRASH_EXIT = 99  # no exit code of the CLI (agent/cli EXIT_CODES) uses it

_raw = os.environ.get(ENV, "")
_target: int | None = int(_raw) if _raw.isascii() and _raw.isdigit() else None
_passed = 0


def point(where: str) -> None:
    """A place a power cut may fall; ends the process here when it is the chosen one."""
    global _passed
    if _target is None:
        return
    _passed += 1
    if _passed == _target:
        os.write(2, f"devid-agent: crash point {_passed}: {where}\n".encode())
        os._exit(CRASH_EXIT)


def child_environment() -> dict[str, str]:
    """What a helper process of the service needs in its environment so that the crash points
    count on there: one numbering for the whole service, as one power cut ends both."""
    if _target is None:
        return {}
    return {ENV: str(_target - _passed)}  # >= 1: at 0 this process would have ended already


def child_ended(returncode: int, points_passed: int) -> None:
    """A helper process ended: a crash point there ends this process too (the power is cut for
    both); the points it passed count as passed here."""
    global _passed
    if _target is None:
        return
    if returncode == CRASH_EXIT:
        os._exit(CRASH_EXIT)
    _passed += points_passed


def passed() -> int:
    """The crash points this process has passed (0 when they are off)."""
    return _passed


def armed() -> bool:
    """Whether crash points are on (so callers may wrap what they would not otherwise)."""
    return _target is not None


#: test only: a file holding seconds to add to the service's clock, read at every reading
CLOCK_ENV = "DEVID_AGENT_TEST_CLOCK_OFFSET_FILE"


def clock_offset_file() -> str | None:
    """The file `$DEVID_AGENT_TEST_CLOCK_OFFSET_FILE` names (None: unset, always outside
    tests). A test writes a large negative number into it to boot the service at 1970, as a
    device without an RTC does, then 0 (or removes it) as NTP would set the clock."""
    return os.environ.get(CLOCK_ENV) or None


def clock_offset(path: str) -> float:
    """The seconds in `path` (missing: 0). Written by the test with a rename: never half."""
    try:
        with open(path, encoding="ascii") as f:
            return float(f.read().strip() or 0)
    except FileNotFoundError:
        return 0.0
