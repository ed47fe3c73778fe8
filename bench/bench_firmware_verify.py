"""Verify speed and memory of `devid-agent firmware verify` against `sha256sum` on the same file.

For each size, writes a signed bundle (random payload) to a temp dir, warms the page cache,
then times `sha256sum BUNDLE` and `devid-agent firmware verify BUNDLE` (a subprocess; best of
--repeat, after one warm-up run that fills a private bytecode cache, as an installed package
has its .pyc files) and reads the verify process's peak RSS from wait4(). It also prints the
start-up floor: a bare interpreter and `firmware status`. Goals: time ratio <= 2 at 16 MiB
(start-up and imports dominate), <= 1.15 from 256 MiB, peak RSS <= 64 MiB and flat from 16 MiB
to 1 GiB. Prints figures; asserts nothing.

    .venv/bin/python bench/bench_firmware_verify.py [--sizes-mib 16,256,1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.firmware.manifest import Manifest  # noqa: E402
from agent.firmware.sign import signed_header  # noqa: E402
from tests.support.ca import pem, utcnow  # noqa: E402
from tests.support.firmware import COMPATIBLE, Vendor  # noqa: E402

MIB = 1024 * 1024


def write_bundle(path: Path, size: int, vendor: Vendor) -> None:
    import hashlib

    block = os.urandom(MIB)
    digest = hashlib.sha256()
    for _ in range(size // MIB):
        digest.update(block)
    manifest = Manifest(
        compatible=COMPATIBLE,
        version="bench",
        security_version=1,
        created=utcnow().replace(microsecond=0),
        payload_size=size,
        hash_algorithm="sha256",
        digest=digest.digest(),
    )
    with open(path, "wb") as f:
        f.write(signed_header(manifest, [vendor.signer]))
        for _ in range(size // MIB):
            f.write(block)


#: Children run as on a device, with compiled bytecode: an installed package has its .pyc files,
#: while this checkout may run with PYTHONDONTWRITEBYTECODE (then every start compiles every
#: module of ours from source). The cache goes to a temp dir, never into the tree.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, env=CHILD_ENV)
    _pid, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed with status {status}")
    return elapsed, usage.ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="16,256,1024")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    vendor = Vendor()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        anchor = work / "anchor.pem"
        anchor.write_bytes(pem(vendor.root.cert))
        config = work / "config.toml"
        config.write_text(
            f'[device]\nid = "bench"\n[firmware]\ncompatible = "{COMPATIBLE}"\n'
            f'trust_anchors = "{anchor}"\nstate_dir = "{work / "state"}"\n'
            f'bootloader = "file"\nfile_env = "{work / "bootenv"}"\ncounter = "file"\n'
            f'cmdline = "{work / "cmdline"}"\n'
        )
        (work / "cmdline").write_text("root=/dev/sda2 rauc.slot=A\n")
        # Start-up, the floor under every ratio: a bare interpreter, and a firmware command
        # that needs no X.509 (status), both in this run.
        CHILD_ENV["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        bare = min(run([sys.executable, "-c", "pass"])[0] for _ in range(args.repeat))
        status_cmd = [sys.executable, "-m", "agent.cli", "--config", str(config),
                      "firmware", "status"]  # fmt: skip
        status = min(run(status_cmd)[0] for _ in range(args.repeat + 1))  # 1st fills the cache
        print(f"start-up: python -c pass {bare:.3f} s; firmware status {status:.3f} s "
              f"({status / bare:.1f}x the bare interpreter)")  # fmt: skip
        print(f"{'size':>8} {'sha256sum s':>12} {'verify s':>9} {'ratio':>6} {'peak RSS':>9}")
        for size_mib in (int(s) for s in args.sizes_mib.split(",")):
            bundle = work / f"bench-{size_mib}.fw"
            write_bundle(bundle, size_mib * MIB, vendor)
            run(["cat", str(bundle)])  # warm the page cache for both contenders
            sha = min(run(["sha256sum", str(bundle)])[0] for _ in range(args.repeat))
            verify_cmd = [sys.executable, "-m", "agent.cli", "--config", str(config),
                          "firmware", "verify", str(bundle)]  # fmt: skip
            results = [run(verify_cmd) for _ in range(args.repeat + 1)][1:]  # after a warm-up
            best = min(t for t, _ in results)
            rss_mib = max(r for _, r in results) / 1024
            print(
                f"{size_mib:>6}Mi {sha:>12.3f} {best:>9.3f} {best / sha:>6.2f} {rss_mib:>6.1f}MiB",
                flush=True,
            )
            bundle.unlink()


if __name__ == "__main__":
    main()
