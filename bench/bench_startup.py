"""Start-up cost of the read-only commands, whole process (printed, never asserted):

median of N runs of `devid-agent status` (not enrolled; enrolled with a software key, text and
--json), `devid-agent firmware status` (file boot env, file counter), `config check` and
`--version`, each as a ratio to `.venv/bin/python -c pass` measured in the same run. Goal: <= 2.5x.

Children run as on a device, with compiled bytecode (an installed package has its .pyc files;
the cache goes to a temp dir, never into the tree). `--no-bytecode` keeps this environment's
PYTHONDONTWRITEBYTECODE, if set: then every start also compiles every module of ours.

Run: .venv/bin/python bench/bench_startup.py [--runs 30] [--no-bytecode]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.identity import IdentityStore  # noqa: E402
from hal.disk import FileStorage, FlockLock  # noqa: E402
from hal.interfaces import KeyAlgorithm  # noqa: E402
from hal.softkeys import SoftwareKeyStore  # noqa: E402
from tests.support.ca import TestCA  # noqa: E402
from tests.support.firmware import Rig  # noqa: E402

GOAL = 2.5
AGENT = [sys.executable, "-m", "agent.cli"]
#: floors, printed beside the commands: what every command stands on before a line of ours
#: (the stdlib modules the CLI cannot do without), and what reading a certificate and checking
#: that the key signs for it costs (`status` with an identity)
_STDLIB = "import argparse, dataclasses, datetime, logging, tomllib, typing"
FLOORS = [
    ("floor: stdlib of the CLI", _STDLIB),
    ("floor: + cryptography",
     f"{_STDLIB}; import cryptography.x509, cryptography.hazmat.primitives.serialization"),
]  # fmt: skip
CHILD_ENV = dict(os.environ)


def wall(argv: list[str], runs: int, *, expect: int | None = None) -> float:
    samples = []
    for _ in range(runs + 1):  # one warm-up run (page cache, .pyc)
        started = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, env=CHILD_ENV)
        samples.append(time.perf_counter() - started)
        if expect is not None and proc.returncode != expect:
            raise SystemExit(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.decode()}")
    return statistics.median(samples[1:])


def enrolled_config(root: Path) -> Path:
    state = root / "state"
    keys = SoftwareKeyStore()
    blob = keys.generate(KeyAlgorithm.EC_P256)
    ca = TestCA()
    cert = ca.issue(keys.public_key(blob), subject="gw-bench")
    store = IdentityStore(state_dir=state, storage=FileStorage(), lock=FlockLock())
    store.install(key_blob=blob, key_file_name=keys.key_file_name, certificate=cert,
                  chain=[], ca_certs=[ca.cert])  # fmt: skip
    path = root / "enrolled.toml"
    path.write_text(f'[device]\nid = "gw-bench"\n[paths]\nstate_dir = "{state}"\n'
                    '[keys]\nstore = "software"\n[control]\nenabled = false\n')  # fmt: skip
    return path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--no-bytecode", action="store_true", help="keep PYTHONDONTWRITEBYTECODE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        root = Path(tmp)
        if not args.no_bytecode:
            CHILD_ENV.pop("PYTHONDONTWRITEBYTECODE", None)
            CHILD_ENV["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
        bare = root / "bare.toml"
        bare.write_text(f'[device]\nid = "gw-bench"\n[paths]\nstate_dir = "{root / "none"}"\n'
                        "[control]\nenabled = false\n")  # fmt: skip
        enrolled = enrolled_config(root)
        rig = Rig(root / "fw", bootloader="file", counter="file")
        cases = [
            ("status, not enrolled", [*AGENT, "--config", str(bare), "status"], 81),
            ("status, enrolled", [*AGENT, "--config", str(enrolled), "status"], 0),
            ("status --json, enrolled", [*AGENT, "--config", str(enrolled), "status", "--json"], 0),
            ("firmware status", [*AGENT, "--config", str(rig.config), "firmware", "status"], 0),
            ("config check", [*AGENT, "--config", str(bare), "config", "check"], 0),
            ("--version", [*AGENT, "--version"], 0),
        ]
        reference = wall([sys.executable, "-c", "pass"], args.runs)
        bytecode = "without cached bytecode" if args.no_bytecode else "with cached bytecode"
        print(f"start-up, whole process, {bytecode}, median of {args.runs} (python -c pass = 1.0x)")
        print(f"  {'python -c pass':24s} {reference * 1e3:7.1f} ms")
        for name, statement in FLOORS:
            median = wall([sys.executable, "-c", statement], args.runs)
            print(f"  {name:24s} {median * 1e3:7.1f} ms  {median / reference:4.1f}x")
        for name, argv, code in cases:
            median = wall(argv, args.runs, expect=code)
            ratio = median / reference
            verdict = "meets" if ratio <= GOAL else "MISSES"
            print(f"  {name:24s} {median * 1e3:7.1f} ms  {ratio:4.1f}x  ({verdict} <= {GOAL}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
