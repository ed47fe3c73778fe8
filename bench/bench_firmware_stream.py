"""Streaming install from HTTPS against `curl -o /dev/null` of the same bundle from the same server.

For each size: a signed bundle (random payload) in a temp dir, served by the test download
server (tests/support/fw_http_server.py) in its own process on 127.0.0.1 over TLS (a test CA).
Times, best of --repeat after one warm-up each: `curl -sS --cacert CA -o /dev/null URL`,
`devid-agent firmware verify URL` (download + verification, nothing written) and
`devid-agent firmware install URL` (download, verify, write slot B, fsync, read it back), and
for reference `firmware install FILE` of the same bundle from the page cache (what the device
side costs without any network). Peak RSS of the HTTPS install from wait4(). Goal: install
<= 1.3x curl; the device's fsync and read-back, which curl -o /dev/null does not do, are the
part the "file" column shows. Prints figures; asserts nothing.

    .venv/bin/python bench/bench_firmware_stream.py [--sizes-mib 64,256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_firmware_verify import CHILD_ENV, MIB, run, write_bundle  # noqa: E402

from tests.support.ca import TestCA, pem  # noqa: E402
from tests.support.firmware import COMPATIBLE, Vendor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="64,256")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    vendor = Vendor()
    tls_ca = TestCA(name="bench download CA")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        CHILD_ENV["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        anchor = work / "anchor.pem"
        anchor.write_bytes(pem(vendor.root.cert))
        ca = tls_ca.write_cert(work / "download-ca.pem")
        cert, key = tls_ca.server_identity(work)
        slots = {name: work / f"slot-{name}.img" for name in "AB"}
        config = work / "config.toml"
        config.write_text(
            f'[device]\nid = "bench"\n[firmware]\ncompatible = "{COMPATIBLE}"\n'
            f'trust_anchors = "{anchor}"\nstate_dir = "{work / "state"}"\n'
            f'crl_dir = "{work / "crl"}"\nstatus_snapshot = ""\n'
            f'bootloader = "file"\nfile_env = "{work / "bootenv"}"\ncounter = "file"\n'
            f'cmdline = "{work / "cmdline"}"\nslot_a = "{slots["A"]}"\n'
            f'slot_b = "{slots["B"]}"\ndownload_ca = "{ca}"\n'
        )
        (work / "cmdline").write_text("root=/dev/sda2 rauc.slot=A\n")
        print(f"{'size':>8} {'curl s':>8} {'verify s':>9} {'ratio':>6} {'install s':>10} "
              f"{'ratio':>6} {'file install s':>15} {'install RSS':>12}")  # fmt: skip
        for size_mib in (int(s) for s in args.sizes_mib.split(",")):
            bundle = work / f"bench-{size_mib}.fw"
            write_bundle(bundle, size_mib * MIB, vendor)
            for slot in slots.values():
                with open(slot, "wb") as f:
                    f.truncate(size_mib * MIB)
            server = subprocess.Popen(
                [sys.executable, "-m", "tests.support.fw_http_server", str(cert), str(key),
                 str(bundle)],
                cwd=ROOT, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                assert server.stdout is not None
                port = int(server.stdout.readline())
                url = f"https://localhost:{port}/bundle.fw"
                curl = ["curl", "-sS", "--cacert", str(ca), "-o", "/dev/null", url]
                agent = [sys.executable, "-m", "agent.cli", "--config", str(config), "firmware"]
                timings = {}
                for name, cmd in (
                    ("curl", curl),
                    ("verify", [*agent, "verify", url]),
                    ("install", [*agent, "install", url]),
                    ("file", [*agent, "install", str(bundle)]),
                ):
                    results = [run(cmd) for _ in range(args.repeat + 1)][1:]  # after a warm-up
                    timings[name] = (min(t for t, _ in results), max(r for _, r in results))
            finally:
                server.terminate()
                server.wait(10)
            c, v, i = timings["curl"][0], timings["verify"][0], timings["install"][0]
            rss, f = timings["install"][1] / 1024, timings["file"][0]
            print(f"{size_mib:>6}Mi {c:>8.3f} {v:>9.3f} {v / c:>6.2f} {i:>10.3f} {i / c:>6.2f} "
                  f"{f:>15.3f} {rss:>9.1f}MiB", flush=True)  # fmt: skip
            bundle.unlink()


if __name__ == "__main__":
    main()
