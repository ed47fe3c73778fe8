"""`make demo`: a device enrolls and renews its identity with a TPM key, end to end.

Starts a software TPM and our EST server (HTTP Basic after a 401 challenge, TLS 1.2 only,
proof-of-possession required) on loopback, writes a config into a temporary directory, runs the
real `devid-agent` CLI as a subprocess: `enroll`, `renew`, `enroll` again (already enrolled),
shows the identity on disk, then runs the service (`devid-agent run`) through two rotations of
its own, and stops everything it started, by PID.

Further steps (firmware) plug in through `tests/support/demo_firmware.py`: if that module
exists, its `run(workdir: Path)` is called after the identity steps.

Run: .venv/bin/python -m tests.support.demo [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import procs
from tests.support.enroll_env import password_file, write_config
from tests.support.swtpm import Swtpm

ROOT = Path(__file__).resolve().parents[2]


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


@dataclass
class DemoContext:
    """What a demo step gets: the work directory, the device config, the TPM, a CLI runner."""

    workdir: Path
    config: Path
    state_dir: Path
    tpm: Swtpm
    provider: Path
    est_info: dict[str, object] = field(default_factory=dict)
    #: processes a step started; stopped (by PID) with the rest at the end
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def cli(self, *args: str, expect: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
        """Run `devid-agent --config CONFIG ARGS...`, echo it, check the exit code."""
        command = [sys.executable, "-m", "agent.cli", "--config", str(self.config), *args]
        print(f"$ devid-agent {' '.join(args)}", flush=True)
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        for stream in (proc.stdout, proc.stderr):
            if stream.strip():
                print("  " + stream.strip().replace("\n", "\n  "), flush=True)
        print(f"  (exit {proc.returncode})", flush=True)
        if proc.returncode not in expect:
            raise SystemExit(f"demo: `devid-agent {' '.join(args)}` exited {proc.returncode}")
        return proc


def provider_path() -> Path:
    marker = ROOT / ".deps" / "tpm2-provider.path"
    if not marker.is_file():
        raise SystemExit("demo: no .deps/tpm2-provider.path: run `make setup` first")
    return Path(marker.read_text().strip()).resolve()


def start_est_server(
    directory: Path, started: list[subprocess.Popen[bytes]], *, lifetime: int = 3600
) -> dict[str, object]:
    proc = procs.start(
        [
            sys.executable, "-m", "tests.support.est_server", "--dir", str(directory),
            "--auth", "basic", "--tls12-only", "--pop-required", "--lifetime", str(lifetime),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    started.append(proc)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"demo: the EST server exited ({proc.wait()}) before it was ready")
    info: dict[str, object] = json.loads(line)
    procs.wait_for_port(int(str(info["port"])), proc=proc)
    return info


def identity_steps(ctx: DemoContext) -> None:
    banner("enroll: first identity, key generated in the TPM, Basic after a 401, PoP over TLS 1.2")
    ctx.cli("enroll")
    banner("renew: re-enroll over mutual TLS with the current TPM key, new key")
    ctx.cli("renew")
    banner("enroll again: idempotent")
    ctx.cli("enroll")
    banner("the identity on disk")
    for path in sorted((ctx.state_dir / "identity").rglob("*")):
        info = path.lstat()
        kind = f"-> {os.readlink(path)}" if path.is_symlink() else f"{info.st_size} bytes"
        print(f"  {info.st_mode & 0o7777:04o}  {path.relative_to(ctx.state_dir)}  {kind}")


def service_step(ctx: DemoContext, rotations: int = 2) -> None:
    """`devid-agent run` with certificates that live 105 s (the EST server back-dates them by
    60 s, so at 60% of their lifetime they are due 3 s after issue): it enrolls, then rotates
    by itself, each time with a new TPM key proven over mutual TLS."""
    import signal
    import time

    banner(f"devid-agent run: the service enrolls, then rotates {rotations} times by itself")
    est = start_est_server(ctx.workdir / "est-service", ctx.started, lifetime=105)
    config = write_config(
        ctx.workdir / "service.toml",
        state_dir=ctx.workdir / "service-state",
        tcti=ctx.tpm.tcti,
        provider=ctx.provider,
        url=est["url"],
        trust_anchor=est["ca_file"],
        username="device",
        password_file=str(password_file(ctx.workdir)),
    )
    config.write_text(
        config.read_text() + "[renewal]\nwindow_start_fraction = 0.6\nwindow_end_fraction = 0.6\n"
    )
    print(f"$ devid-agent --config {config.name} run", flush=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--config", str(config), "run"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = 0
    deadline = time.monotonic() + 120
    try:
        for line in proc.stderr:
            if " agent.daemon: " in line or "proved itself" in line:
                print("  " + line.split(" INFO ", 1)[-1].split(" WARNING ", 1)[-1].rstrip())
            if "agent.daemon: identity generation" in line:
                seen += 1
            if seen > rotations or time.monotonic() > deadline:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    print(f"  (SIGTERM: exit {code})", flush=True)


def firmware_step(ctx: DemoContext) -> None:
    """Sign a firmware bundle and install it into file-backed A/B slots, with the anti-rollback
    counter in the demo's swtpm (tests/support/demo_firmware.py)."""
    from tests.support import demo_firmware

    demo_firmware.run(ctx.workdir, tcti=ctx.tpm.tcti)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="devid-agent demo")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="devid-demo-"))
    started: list[subprocess.Popen[bytes]] = []
    tpm = Swtpm(workdir / "tpm-state")
    try:
        banner(f"starting swtpm and the EST server (work directory {workdir})")
        tpm.start()
        print(f"  swtpm pid {tpm.proc.pid if tpm.proc else '?'} on {tpm.tcti}")
        est_info = start_est_server(workdir / "est", started)
        print(f"  EST server pid {est_info['pid']} at {est_info['url']}")
        provider = provider_path()
        state_dir = workdir / "state"
        config = write_config(
            workdir / "config.toml",
            state_dir=state_dir,
            tcti=tpm.tcti,
            provider=provider,
            url=est_info["url"],
            trust_anchor=est_info["ca_file"],
            username="device",
            password_file=str(password_file(workdir)),
            proof_of_possession="always",
        )
        ctx = DemoContext(
            workdir=workdir,
            config=config,
            state_dir=state_dir,
            tpm=tpm,
            provider=provider,
            est_info=est_info,
            started=started,
        )
        identity_steps(ctx)
        service_step(ctx)
        firmware_step(ctx)
        banner("done")
        return 0
    finally:
        for proc in reversed(started):
            procs.stop(proc)
        tpm.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
