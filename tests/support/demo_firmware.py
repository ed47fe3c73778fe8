"""The `make demo` firmware step: a vendor signs an image with `devid-agent firmware sign`, the
device installs it into file-backed A/B slots with a real U-Boot environment, "reboots" into it
(RAUC's boot logic applied to the env), commits, and refuses an older bundle.

Every device command runs the real CLI in a subprocess, as an OTA hook would. Given the demo's
swtpm (`tcti`), the anti-rollback version is held in a TPM NV counter, as on a device.
Run alone: python -m tests.support.demo_firmware [WORKDIR]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.firmware import Rig, image

ROOT = Path(__file__).resolve().parents[2]


def _cli(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "agent.cli", *args]
    print("$ devid-agent " + " ".join(args), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    for line in (done.stdout + done.stderr).splitlines():
        print("  " + line)
    print(f"  (exit status {done.returncode})", flush=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"devid-agent {' '.join(args)} failed with {done.returncode}")
    return done


def run(workdir: Path, *, tcti: str | None = None) -> None:
    """With `tcti` (the demo's swtpm), the security version lives in a TPM NV counter index,
    as on a device; without it, in the weaker file counter."""
    bootloader = "uboot" if shutil.which("fw_setenv") and shutil.which("mkenvimage") else "file"
    counter = "tpm" if tcti else "file"
    rig = Rig(workdir / "firmware-device", bootloader=bootloader, counter=counter, tcti=tcti or "")
    config = rig.config.name
    vendor = {name: path.name for name, path in rig.files.items()}
    cwd = rig.root
    print(f"== firmware: vendor signs, device installs ({bootloader} env, file slots, "
          f"{counter} anti-rollback counter)")  # fmt: skip

    bundles = {}
    for version, security_version, seed in (("1.0.0", 1, 1), ("2.0.0", 2, 2)):
        img = f"rootfs-{version}.img"
        (cwd / img).write_bytes(image(200 * 1024, seed=seed))
        bundles[version] = f"rootfs-{version}.fw"
        _cli(cwd, "firmware", "sign", "--key", vendor["key"], "--cert", vendor["cert"],
             "--chain", vendor["chain"], "--compatible", rig.compatible,
             "--version", version, "--security-version", str(security_version),
             img, "-o", bundles[version])  # fmt: skip

    _cli(cwd, "--config", config, "firmware", "commit")  # the factory image marks itself good
    _cli(cwd, "--config", config, "firmware", "verify", bundles["2.0.0"])
    _cli(cwd, "--config", config, "firmware", "install", bundles["2.0.0"])
    _cli(cwd, "--config", config, "firmware", "status")
    print(f"-- reboot: the bootloader picks slot {rig.reboot()}")
    _cli(cwd, "--config", config, "firmware", "commit")
    _cli(cwd, "--config", config, "firmware", "status")
    print("-- an older bundle is refused (anti-rollback):")
    _cli(cwd, "--config", config, "firmware", "install", bundles["1.0.0"], check=False)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        run(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp))
