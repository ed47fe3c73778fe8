"""Files keep their intended modes whatever the umask; a symlinked or FIFO grubenv is handled as
documented; bootloader tools are absolute paths run with a fixed environment (issue 14, 3-4).

The CLI runs as a separate process here, as an OTA hook runs it: with the caller's umask, PATH
and environment.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.firmware import Rig, cli, image, make_bundle

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = image(16 * 1024, seed=14)
AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
HOSTILE_UID = 4242


def run_cli(
    rig: Rig, *args: str, umask: int | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(rig.config), "firmware", *args],
        capture_output=True, text=True, cwd=ROOT, check=False,
        umask=-1 if umask is None else umask,
        env=env if env is not None else dict(os.environ),
    )  # fmt: skip


def install(rig: Rig, **kw: object) -> subprocess.CompletedProcess[str]:
    path = rig.write_bundle(make_bundle(PAYLOAD, [rig.vendor.signer]))
    return run_cli(rig, "install", str(path), **kw)  # type: ignore[arg-type]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- modes whatever the umask -----------------------------------------------------------------


@pytest.mark.parametrize(("original", "after"), [(0o644, 0o644), (0o600, 0o600), (0o666, 0o644)])
def test_grubenv_keeps_its_mode_under_umask_000(tmp_path: Path, original: int, after: int) -> None:
    # Found in review: `umask 000; firmware commit` left grubenv -rw-rw-rw-.
    rig = Rig(tmp_path / "dev", bootloader="grub")
    os.chmod(rig.grubenv, original)
    done = install(rig, umask=0o000)
    assert done.returncode == 0, done.stderr
    assert rig.env()["ORDER"] == "B A"
    assert mode(rig.grubenv) == after
    rig.reboot()
    done = run_cli(rig, "commit", umask=0o000)
    assert done.returncode == 0, done.stderr
    assert mode(rig.grubenv) == after


@AS_ROOT
def test_grubenv_keeps_its_owner(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "dev", bootloader="grub")
    os.chown(rig.grubenv, HOSTILE_UID, HOSTILE_UID)
    assert install(rig, umask=0).returncode == 0
    st = os.stat(rig.grubenv)
    assert (st.st_uid, st.st_gid) == (HOSTILE_UID, HOSTILE_UID)
    assert stat.S_IMODE(st.st_mode) == 0o644


def test_uboot_env_and_state_modes_under_umask_000(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "dev", bootloader="uboot")
    modes = {p: mode(p) for p in rig.env_files}
    done = install(rig, umask=0o000)
    assert done.returncode == 0, done.stderr
    assert {p: mode(p) for p in rig.env_files} == modes  # libubootenv writes in place
    for path in rig.state_dir.iterdir():
        assert mode(path) & 0o077 == 0, path
    assert mode(rig.state_dir) == 0o700


def test_signed_bundle_is_0644_under_umask_000(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "dev", bootloader="file")
    img = rig.root / "image.bin"
    img.write_bytes(PAYLOAD)
    out = rig.root / "signed.fw"
    done = run_cli(
        rig, "sign", "--key", str(rig.files["key"]), "--cert", str(rig.files["cert"]),
        "--chain", str(rig.files["chain"]), "--compatible", rig.compatible, "--version", "1",
        "--security-version", "1", str(img), "-o", str(out), umask=0o000,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert mode(out) == 0o644


# -- a symlinked or odd grubenv ---------------------------------------------------------------


def linked_rig(tmp_path: Path, target_dir_mode: int) -> tuple[Rig, Path]:
    rig = Rig(tmp_path / "dev", bootloader="grub")
    efi = rig.root / "efi"
    efi.mkdir(mode=0o755)
    target = efi / "grubenv"
    os.rename(rig.grubenv, target)
    os.symlink("efi/grubenv", rig.grubenv)
    os.chmod(efi, target_dir_mode)
    return rig, target


def test_symlinked_grubenv_is_written_through_to_its_target(tmp_path: Path) -> None:
    rig, target = linked_rig(tmp_path, 0o755)
    done = install(rig, umask=0o000)
    assert done.returncode == 0, done.stderr
    assert os.path.islink(rig.grubenv) and os.readlink(rig.grubenv) == "efi/grubenv"
    assert rig.env()["ORDER"] == "B A"
    assert mode(target) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["grubenv"]  # no temp left


def test_symlinked_grubenv_into_a_writable_directory_is_refused(tmp_path: Path) -> None:
    rig, target = linked_rig(tmp_path, 0o777)
    before = target.read_bytes()
    done = install(rig)  # as root the config check refuses it first (docs/security.md)
    assert done.returncode == 78
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "firmware.grub_env" in lines[0]
    assert "is writable by group or others (mode 0777)" in lines[0]
    assert target.read_bytes() == before
    # and the boot control itself refuses it, for whoever runs it without that check
    from agent.errors import BootControlError
    from hal.bootloader.grub import GrubBootControl

    with pytest.raises(BootControlError, match="whose directory others can write: refused"):
        GrubBootControl(env_file=rig.grubenv).mark_good("A")
    assert target.read_bytes() == before
    os.chmod(target.parent, 0o755)


def test_fifo_grubenv_does_not_hang(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "dev", bootloader="grub")
    rig.grubenv.unlink()
    os.mkfifo(rig.grubenv)
    code, _, err = cli(rig.config, "status")
    assert code == 74 and "is not a regular file" in err and len(err.strip().splitlines()) == 1


# -- tools by absolute path, in a fixed environment -------------------------------------------


def hostile_bin(tmp_path: Path, marker: Path) -> Path:
    bin_dir = tmp_path / "hostile-bin"
    bin_dir.mkdir()
    for name in ("fw_printenv", "fw_setenv", "grub-editenv"):
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\necho {name} >> {marker}\nexit 0\n")
        tool.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("bootloader", ["uboot", "grub"])
def test_hostile_tool_earlier_on_path_never_runs(tmp_path: Path, bootloader: str) -> None:
    # Found in review: a fw_printenv earlier on PATH ran as uid 0 from an OTA hook.
    rig = Rig(tmp_path / "dev", bootloader=bootloader)
    marker = tmp_path / "ran"
    env = {**os.environ, "PATH": f"{hostile_bin(tmp_path, marker)}:{os.environ['PATH']}"}
    assert install(rig, env=env).returncode == 0
    done = run_cli(rig, "status", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    assert rig.env()[("BOOT_ORDER" if bootloader == "uboot" else "ORDER")] == "B A"


def test_tools_get_only_a_fixed_path_and_lc_all(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "dev", bootloader="uboot")
    seen = tmp_path / "env-seen"
    wrapper = tmp_path / "printenv-wrapper"
    wrapper.write_text(f'#!/bin/sh\n/usr/bin/env > {seen}\nexec /usr/bin/fw_printenv "$@"\n')
    wrapper.chmod(0o755)
    rig.config.write_text(
        rig.config.read_text().replace("[firmware]\n", f'[firmware]\nfw_printenv = "{wrapper}"\n')
    )
    env = {**os.environ, "LD_PRELOAD": "", "DEVID_HOSTILE": "1", "LANG": "de_DE.UTF-8"}
    done = run_cli(rig, "status", env=env)
    assert done.returncode == 0, done.stderr
    lines = set(seen.read_text().splitlines())
    assert {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"} <= lines
    names = {line.split("=", 1)[0] for line in lines}
    assert names <= {"PATH", "LC_ALL", "PWD"}, names  # the shell adds PWD, nothing else


@pytest.mark.parametrize("key", ["fw_printenv", "fw_setenv", "grub_editenv"])
def test_tool_paths_must_be_absolute(tmp_path: Path, key: str) -> None:
    rig = Rig(tmp_path / "dev", bootloader="uboot")
    rig.config.write_text(
        rig.config.read_text().replace("[firmware]\n", f'[firmware]\n{key} = "fw_tool"\n')
    )
    code, _, err = cli(rig.config, "status")
    assert code == 78 and f"firmware.{key}" in err
