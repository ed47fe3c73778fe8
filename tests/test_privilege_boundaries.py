"""The service user must not steer what root does (docs/security.md).

A second uid (4242, standing in for the `devid-agent` service user) plays the attacker against
root's runs of the firmware CLI, with the attacks a security review reproduced end to end:
swapping root's state directory for a symlink, planting a state file or a counter baseline,
a rename-exchange race, squatting the TPM counter's NV index. Every one must be refused with the
device's slots, boot env and state exactly as they were. They need root and a second uid: CI
runs as root, so they run there.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.cli import EXIT_CONFIG, EXIT_TRUST
from hal.tpm import open_esapi
from hal.tpm_counter import DEFAULT_INDEX
from tests.conftest import ROOT
from tests.support.firmware import Rig, cli, image, make_bundle
from tests.support.swtpm import Swtpm

ATTACKER = 4242

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="plays a second uid against root")


def _drop_to_attacker() -> None:
    os.setgroups([])
    os.setresgid(ATTACKER, ATTACKER, ATTACKER)
    os.setresuid(ATTACKER, ATTACKER, ATTACKER)
    assert os.geteuid() == ATTACKER  # and no capability survives a full uid change


def attacker(fn: Callable[[], object], *, wait: bool = True) -> int:
    """Run `fn` in a forked child that has become uid 4242 (no exec: the interpreter may live
    where that uid cannot reach). Returns its exit status (0: `fn` returned), or its PID."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            _drop_to_attacker()
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    if not wait:
        return pid
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def attacker_sh(command: str) -> int:
    return attacker(lambda: subprocess.run(["sh", "-c", command], check=True, timeout=60))


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory both users can reach (pytest's tmp_path is root-only)."""
    base = Path(tempfile.mkdtemp(prefix="devid-priv-", dir="/tmp"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base)


def service_dir(world: Path) -> Path:
    """The service's own state directory (StateDirectory= with User=devid-agent)."""
    svc = world / "var-lib-devid-agent"
    svc.mkdir(mode=0o700)
    os.chown(svc, ATTACKER, ATTACKER)
    return svc


def committed_rig(world: Path, **kw: object) -> Rig:
    """A device that installed and committed security version 2 (safe layout)."""
    rig = Rig(world / "dev", bootloader="uboot", **kw)  # type: ignore[arg-type]
    v2 = rig.write_bundle(make_bundle(image(8192, 2), [rig.vendor.signer], security_version=2))
    assert cli(rig.config, "install", str(v2))[0] == 0
    assert rig.reboot() == "B"
    assert cli(rig.config, "commit")[0] == 0
    return rig


def move_state_under(rig: Rig, svc: Path) -> Path:
    """The layout of the old default: root's firmware state inside the service's directory."""
    target = svc / "firmware"
    os.rename(rig.state_dir, target)
    rig.state_dir = target
    rig.write_config()
    return target


def swap_in(svc: Path, files: dict[str, str], *, symlink: bool = False) -> None:
    """The attacker's move: its own directory, holding `files`, where root's state was."""
    evil = svc / "evil"
    evil.mkdir(mode=0o755)
    for name, text in files.items():
        (evil / name).write_text(text)
    os.rename(svc / "firmware", svc / "firmware.real")
    if symlink:
        (svc / "firmware").symlink_to(evil)
    else:
        os.rename(evil, svc / "firmware")


def downgrade_bundle(rig: Rig) -> Path:
    return rig.write_bundle(
        make_bundle(image(8192, 1), [rig.vendor.signer], security_version=1), "old.fw"
    )


def refused_as_config(rig: Rig, *args: str) -> str:
    code, out, err = cli(rig.config, *args)
    assert code == EXIT_CONFIG, (code, out, err)
    assert out == "" and len(err.strip().splitlines()) == 1
    return err


def test_the_old_layout_is_refused_before_anything_is_read(world: Path) -> None:
    rig = committed_rig(world)
    svc = service_dir(world)
    move_state_under(rig, svc)
    before = rig.snapshot()
    from agent.cli import main

    assert main(["--config", str(rig.config), "config", "check"]) == EXIT_CONFIG
    for args in (("install", str(downgrade_bundle(rig))), ("status", "--json"), ("commit",),
                 ("rollback",), ("verify", str(downgrade_bundle(rig)))):  # fmt: skip
        err = refused_as_config(rig, *args)
        assert f"firmware.state_dir = '{svc}/firmware'" in err
        assert f"{svc} is owned by uid {ATTACKER}" in err
    assert rig.snapshot() == before


def test_a_swapped_in_symlink_to_a_world_writable_dir_is_neither_used_nor_chmodded(
    world: Path,
) -> None:
    rig = committed_rig(world)
    svc = service_dir(world)
    move_state_under(rig, svc)
    open_dir = world / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o1777)
    assert (
        attacker_sh(f"mv {svc}/firmware {svc}/firmware.real && ln -s {open_dir} {svc}/firmware")
        == 0
    )
    rig.state_dir = svc / "firmware.real"  # where root's records now are, for the snapshot
    before = rig.snapshot()
    refused_as_config(rig, "install", str(downgrade_bundle(rig)))
    assert (open_dir.stat().st_mode & 0o7777) == 0o1777 and list(open_dir.iterdir()) == []
    assert rig.snapshot() == before
    assert json.loads((rig.state_dir / "state.json").read_text())["slots"]["B"]["version"]


def test_a_planted_state_file_is_not_believed_by_status(world: Path) -> None:
    rig = committed_rig(world)
    svc = service_dir(world)
    move_state_under(rig, svc)
    planted = {"format": 1, "pending": "B", "fell_back_from": None, "slots": {"B": {
        "state": "installed", "version": "9.9.9-attacker", "security_version": 300,
        "hash_algorithm": "sha256", "digest": "00", "size": 1, "updated": ""}}}  # fmt: skip
    assert attacker(lambda: swap_in(svc, {"state.json": json.dumps(planted)})) == 0
    for args in (("status", "--json"), ("commit",), ("verify", str(downgrade_bundle(rig)))):
        err = refused_as_config(rig, *args)
        assert "9.9.9" not in err


def test_a_planted_baseline_cannot_open_a_downgrade_with_the_tpm_counter(
    world: Path, swtpm: Swtpm
) -> None:
    rig = committed_rig(world, counter="tpm", tcti=swtpm.tcti)
    svc = service_dir(world)
    move_state_under(rig, svc)
    # The attacker reads the raw counter (AUTHREAD, empty auth) and plants baseline = raw.

    def plant() -> None:
        raw = read_raw_counter(swtpm.tcti)  # AUTHREAD with an empty auth: anyone may read it
        baseline = json.dumps({"index": DEFAULT_INDEX, "baseline": raw})
        swap_in(svc, {"tpm-counter-baseline.json": baseline}, symlink=True)

    assert attacker(plant) == 0
    rig.state_dir = svc / "firmware.real"
    before = rig.snapshot()
    refused_as_config(rig, "install", str(downgrade_bundle(rig)))
    refused_as_config(rig, "status")
    assert rig.snapshot() == before
    assert rig.env()["BOOT_ORDER"].startswith("B")  # still boots the committed slot


def read_raw_counter(tcti: str) -> int:
    with open_esapi(tcti) as ectx:
        handle = ectx.tr_from_tpmpublic(DEFAULT_INDEX)
        return int.from_bytes(bytes(ectx.nv_read(handle, 8, 0, auth_handle=handle)), "big")


def test_a_planted_high_security_version_cannot_lock_updates_out(world: Path, swtpm: Swtpm) -> None:
    rig = committed_rig(world, counter="tpm", tcti=swtpm.tcti)
    svc = service_dir(world)
    move_state_under(rig, svc)
    raw = read_raw_counter(swtpm.tcti)
    state = json.loads((rig.state_dir / "state.json").read_text())
    state["slots"]["B"]["security_version"] = 300
    assert attacker(lambda: swap_in(svc, {"state.json": json.dumps(state)})) == 0
    refused_as_config(rig, "commit")  # what the mark-good service runs at every boot
    assert read_raw_counter(swtpm.tcti) == raw


RENAME_EXCHANGE = 2
AT_FDCWD = -100


def test_a_rename_exchange_race_never_wins(world: Path) -> None:
    rig = committed_rig(world)
    svc = service_dir(world)
    move_state_under(rig, svc)
    # The attacker's own directory, with a state file naming a version that must never show.
    evil = {"format": 1, "pending": None, "fell_back_from": None, "slots": {"A": {
        "state": "good", "version": "9.9.9-attacker", "security_version": 0,
        "hash_algorithm": "", "digest": "", "size": 0, "updated": ""}}}  # fmt: skip
    read_end, write_end = os.pipe()

    def race() -> None:
        os.close(read_end)
        (svc / "evil").mkdir(mode=0o755)
        (svc / "evil" / "state.json").write_text(json.dumps(evil))
        libc = ctypes.CDLL(None, use_errno=True)
        os.write(write_end, b"ready\n")
        swaps = 0
        for _ in range(2_000_000):  # bounded; stopped by PID long before
            if libc.renameat2(AT_FDCWD, bytes(svc / "firmware"), AT_FDCWD, bytes(svc / "evil"),
                              RENAME_EXCHANGE) == 0:  # fmt: skip
                swaps += 1
                if swaps % 64 == 0:
                    os.write(write_end, b"+")

    pid = attacker(race, wait=False)
    os.close(write_end)
    try:
        assert os.read(read_end, 6) == b"ready\n"
        for _ in range(30):
            code, out, err = cli(rig.config, "status", "--json")
            assert code == EXIT_CONFIG and "9.9.9" not in out + err
            code, out, err = cli(rig.config, "commit")
            assert code == EXIT_CONFIG and "9.9.9" not in out + err
        swaps = len(os.read(read_end, 1 << 20)) * 64  # at least this many, while root ran
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
    assert swaps > 0  # the directories really were exchanged under root, again and again


def squat_counter_index(tcti: str) -> None:
    """The attacker's move (any TPM user, the owner auth being empty): define the counter's
    index first, with AUTHWRITE, so that it can raise it with no owner auth."""
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_NT, TPMA_NV
    from tpm2_pytss.types import TPM2B_AUTH, TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

    attrs = (
        TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA
        | (TPM2_NT.COUNTER << TPMA_NV.TPM2_NT_SHIFT)
    )  # fmt: skip
    public = TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(
        nvIndex=DEFAULT_INDEX, nameAlg=TPM2_ALG.SHA256, attributes=attrs, authPolicy=b"",
        dataSize=8))  # fmt: skip
    with open_esapi(tcti) as ectx:
        ectx.nv_define_space(TPM2B_AUTH(b""), public, ESYS_TR.OWNER)


def increment_squatted_index(tcti: str, times: int) -> None:
    with open_esapi(tcti) as ectx:
        handle = ectx.tr_from_tpmpublic(DEFAULT_INDEX)
        for _ in range(times):
            ectx.nv_increment(handle, auth_handle=handle)


def test_a_squatted_counter_index_is_refused_as_a_security_event(world: Path, swtpm: Swtpm) -> None:
    rig = Rig(world / "dev", bootloader="uboot", counter="tpm", tcti=swtpm.tcti)
    assert attacker(lambda: squat_counter_index(swtpm.tcti)) == 0
    v2 = rig.write_bundle(make_bundle(image(8192, 2), [rig.vendor.signer], security_version=2))
    before = rig.snapshot()
    code, _out, err = cli(rig.config, "install", str(v2))
    assert code == EXIT_TRUST and len(err.strip().splitlines()) == 1
    assert "is not the one devid-agent defines" in err and "tpm2_changeauth -c owner" in err
    assert rig.snapshot() == before
    assert attacker(lambda: increment_squatted_index(swtpm.tcti, 40)) == 0  # its index...
    for args in (("commit",), ("status",), ("install", str(v2))):
        code, out, err = cli(rig.config, *args)  # ...but root never takes it for ours
        assert code == EXIT_TRUST and "not the one devid-agent defines" in err
        assert "42" not in out
    assert rig.snapshot() == before


def test_the_default_layout_gives_the_service_user_nothing_to_touch(world: Path) -> None:
    rig = Rig(world / "dev", bootloader="uboot")
    fw = world / "var-lib-devid-agent-firmware"
    rig.state_dir = fw / "private"
    rig.status_snapshot = fw / "status.json"
    rig.write_config()
    from agent.cli import main

    assert main(["--config", str(rig.config), "config", "check"]) == 0
    v2 = rig.write_bundle(make_bundle(image(8192, 2), [rig.vendor.signer], security_version=2))
    assert cli(rig.config, "install", str(v2))[0] == 0
    assert (rig.state_dir.stat().st_mode & 0o777) == 0o700 and rig.state_dir.stat().st_uid == 0
    assert (rig.status_snapshot.stat().st_mode & 0o777) == 0o644
    for attack in (
        f"mv {rig.state_dir} {fw}/x",
        f"ln -s /tmp {fw}/evil",
        f"cat {rig.state_dir}/state.json",
        f"sh -c 'echo {{}} > {rig.status_snapshot}'",
    ):
        assert attacker_sh(attack) != 0, attack
    # The service user reads root's snapshot, never root's state: the same answer as root's.
    os.chmod(rig.config, 0o644)
    as_root = json.loads(cli(rig.config, "status", "--json")[1])
    answer = world / "answer.json"
    answer.touch()
    os.chown(answer, ATTACKER, ATTACKER)

    def service_status() -> None:
        with open(answer, "w") as out, contextlib.redirect_stdout(out):
            assert main(["--config", str(rig.config), "firmware", "status", "--json"]) == 0

    assert attacker(service_status) == 0
    assert json.loads(answer.read_text()) == as_root
    assert as_root["pending"] == "B"


@pytest.mark.parametrize("key", ["trust_anchors", "grub_env", "cmdline", "crl_dir"])
def test_config_check_as_root_refuses_root_used_paths_the_service_user_could_replace(
    world: Path, key: str
) -> None:
    rig = Rig(world / "dev", bootloader="grub")
    svc = service_dir(world)
    text = rig.config.read_text()
    original = {"trust_anchors": rig.files["anchor"], "grub_env": rig.grubenv,
                "cmdline": rig.cmdline, "crl_dir": rig.root / "fwcrl"}[key]  # fmt: skip
    rig.config.write_text(text.replace(f'{key} = "{original}"', f'{key} = "{svc}/{key}"'))
    from agent.cli import main

    code = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(rig.config), "config", "check"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert code.returncode == EXIT_CONFIG
    assert f"firmware.{key} = '{svc}/{key}': {svc} is owned by uid {ATTACKER}" in code.stderr
    assert main(["--config", str(rig.config), "config", "check"]) == EXIT_CONFIG
