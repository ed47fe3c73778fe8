"""Power cuts at every crash point of `firmware install` (hal.faults: before and after each write,
fsync and rename of the state file, each chunk written to the slot, each bootloader tool run).

After each cut the booted slot is untouched, the U-Boot env is valid, the bootloader would boot
either the old slot or a completely installed new one, status does not mistake the cut for a
fallback, and the next install succeeds. Deterministic: every point, in order, once.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from hal.faults import CRASH_EXIT, ENV
from tests.support.firmware import Rig, cli, image, make_bundle, uboot_boot_script

ROOT = Path(__file__).resolve().parent.parent
MAX_POINTS = 400  # far above what one install passes: a loop that never ends is a bug


def install(rig: Rig, bundle: Path, crash_at: int | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if crash_at is not None:
        env[ENV] = str(crash_at)
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(rig.config), "firmware", "install",
         str(bundle)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def check_intact(rig: Rig, slot_a: bytes) -> str:
    """Assert the invariants; return what the cut left behind (for the distribution)."""
    assert rig.slot["A"].read_bytes() == slot_a, "the booted slot changed"
    env = rig.env()  # fw_printenv must succeed: the env is valid
    assert int(env.get("BOOT_A_LEFT", "3"), 16) > 0, "no fallback to the booted slot"
    slot, _changes = uboot_boot_script(env)
    assert slot in ("A", "B")
    record = json.loads((rig.state_dir / "state.json").read_text())["slots"].get("B")
    if slot == "B":  # the bootloader would boot B: it must be complete and recorded
        assert record is not None and record["state"] == "installed"
        written = rig.slot["B"].read_bytes()[: record["size"]]
        assert hashlib.sha256(written).hexdigest() == record["digest"]
    code, out, err = cli(rig.config, "status", "--json")
    assert code == 0, err
    assert json.loads(out)["fell_back"] is False, "an interrupted install looks like a fallback"
    return f"{record['state'] if record else 'no record'}, next boot {slot}"


def test_a_power_cut_at_every_crash_point_of_an_install(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "dev", bootloader="uboot")
    assert cli(rig.config, "commit")[0] == 0
    bundles = [
        rig.write_bundle(
            make_bundle(image(64 * 1024, seed=n), [rig.vendor.signer], version=f"1.{n}"),
            f"v{n}.fw",
        )
        for n in range(2)
    ]
    slot_a = rig.slot["A"].read_bytes()
    outcomes: collections.Counter[str] = collections.Counter()
    where: list[str] = []
    for n in range(1, MAX_POINTS):
        bundle = bundles[n % 2]  # alternate, so a half-written slot differs from both
        cut = install(rig, bundle, n)
        if cut.returncode == 0:
            break  # the install passed fewer than n points: every one has been cut
        assert cut.returncode == CRASH_EXIT, cut.stderr
        where.append(cut.stderr.strip().rsplit(": ", 1)[-1])
        outcomes[check_intact(rig, slot_a)] += 1
        after = install(rig, bundle, None)
        assert after.returncode == 0, after.stderr
        check_intact(rig, slot_a)
    else:
        raise AssertionError(f"install still crashing after {MAX_POINTS} points")
    print("crash points:", len(where), "outcomes:", dict(outcomes))
    kinds = {Path(point.split()[0]).name for point in where}
    # every kind of step was cut: state writes, their fsyncs and renames, the slot, the tools
    assert {"write", "fsync", "rename", "fw_printenv", "fw_setenv"} <= kinds, kinds
    assert any(point == "write slot B" for point in where)
    assert any(outcome.startswith("writing") for outcome in outcomes), outcomes
    assert rig.reboot() == "B"
    assert cli(rig.config, "commit")[0] == 0
