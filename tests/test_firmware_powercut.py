"""Power cuts: kill -9 `firmware install` (and its fw_setenv) at random moments. Afterwards the
booted slot is untouched, the U-Boot env is valid, the bootloader would boot either the old
slot or a completely installed new one, and the next install succeeds."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.firmware import Rig, cli, image, make_bundle, uboot_boot_script

ROOT = Path(__file__).resolve().parent.parent
RUNS = 100


def _mtimes(paths: list[Path]) -> list[int]:
    return [p.stat().st_mtime_ns if p.exists() else 0 for p in paths]


def _writing(state_file: Path) -> bool:
    with contextlib.suppress(OSError):
        return '"writing"' in state_file.read_text()
    return False


def run_install(
    rig: Rig,
    bundle: Path,
    kill_after: float | None,
    *,
    after_first_write: bool = False,
    while_writing: bool = False,
) -> float:
    """Run the CLI; SIGKILL its process group `kill_after` seconds after start, or after its
    first write to the env or the state file when `after_first_write` (the CLI spends most of
    its life importing and verifying; the writes are the last few milliseconds), or once the
    state file says the slot is being written when `while_writing` (that phase lasts about as
    long as the 128 KiB take to write and read back: random cuts alone rarely land in it)."""
    watched = [*rig.env_files, rig.state_dir / "state.json"]
    before = _mtimes(watched)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--config", str(rig.config), "firmware", "install",
         str(bundle)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    if kill_after is None:
        assert proc.wait(60) == 0
        return time.monotonic() - started
    if after_first_write:
        while proc.poll() is None and _mtimes(watched) == before:
            time.sleep(0.0002)
    if while_writing:
        while proc.poll() is None and not _writing(rig.state_dir / "state.json"):
            time.sleep(0.0001)
    try:
        proc.wait(kill_after)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the CLI and any fw_setenv it runs
        proc.wait()
    return time.monotonic() - started


def check_intact(rig: Rig, slot_a: bytes) -> str:
    """Assert the invariants; return what the cut left behind (for the distribution)."""
    assert rig.slot["A"].read_bytes() == slot_a, "the booted slot changed"
    env = rig.env()  # fw_printenv must succeed: the env is valid
    assert int(env.get("BOOT_A_LEFT", "3")) > 0, "no fallback to the booted slot"
    slot, _changes = uboot_boot_script(env)
    assert slot in ("A", "B")
    record = json.loads((rig.state_dir / "state.json").read_text())["slots"]["B"]
    if slot == "B":  # the bootloader would boot B: it must be complete and recorded
        assert record["state"] == "installed"
        written = rig.slot["B"].read_bytes()[: record["size"]]
        assert hashlib.sha256(written).hexdigest() == record["digest"]
    code, out, err = cli(rig.config, "status", "--json")
    assert code == 0, err
    assert json.loads(out)["fell_back"] is False, "an interrupted install looks like a fallback"
    return f"{record['state']}, next boot {slot}"


@pytest.mark.slow
def test_kill_install_at_random_moments(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "dev", bootloader="uboot")
    assert cli(rig.config, "commit")[0] == 0
    bundles = [
        rig.write_bundle(
            make_bundle(image(128 * 1024, seed=n), [rig.vendor.signer], version=f"1.{n}"),
            f"v{n}.fw",
        )
        for n in range(2)
    ]
    slot_a = rig.slot["A"].read_bytes()
    full = run_install(rig, bundles[0], None)
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    outcomes: collections.Counter[str] = collections.Counter()
    for i in range(RUNS):
        bundle = bundles[i % 2]  # alternate, so a half-written slot differs from both
        if i % 4 == 0:
            run_install(rig, bundle, rng.uniform(0.5 * full, 1.1 * full))
        elif i % 4 == 1:
            run_install(rig, bundle, rng.uniform(0, 0.002), while_writing=True)
        else:
            run_install(rig, bundle, rng.uniform(0, 0.006), after_first_write=True)
        outcomes[check_intact(rig, slot_a)] += 1
        code, _out, err = cli(rig.config, "install", str(bundle))
        assert code == 0, err
        check_intact(rig, slot_a)
    print("power cut outcomes:", dict(outcomes))
    # The cuts must have hit the slot write itself, not only the steps around it (the cuts
    # made while the state file says "writing" are there for that).
    assert any(outcome.startswith("writing") for outcome in outcomes), outcomes
    assert rig.reboot() == "B"
    assert cli(rig.config, "commit")[0] == 0
