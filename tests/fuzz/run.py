"""Run the fuzz targets with atheris (coverage-guided, libFuzzer) under a memory limit.

    .venv/bin/python -m tests.fuzz.run [--seconds N] [TARGET ...]      # every target by default
    .venv/bin/python -m tests.fuzz.run --one TARGET --seconds N          # one libFuzzer process

Each target runs in its own process with RLIMIT_AS set (an input that makes a parser allocate
without bound then fails with MemoryError, a finding), libFuzzer's `-rss_limit_mb` and a
per-input `-timeout` (a hang is a finding). The seeds in tests/fuzz/corpus/<target>/ are read,
never written: new inputs go to .fuzz/<target>/corpus, findings to .fuzz/<target>/ as
crash-*, timeout-*, oom-* or slow-unit-* files (copy a fixed one into the seed corpus as
crash-<what> to keep it as a regression seed). The summary prints, per target, executions,
libFuzzer's coverage figures (cov: edges, ft: features) and findings; the exit status is 1 if
any target found something.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "fuzz" / "corpus"
#: address space per target process (the Python interpreter, cryptography and libFuzzer need
#: a few hundred MiB; the rest is what a parser may take for one input)
MEMORY_MB = 2048
#: seconds one input may take before libFuzzer calls it a hang
TIMEOUT_SECONDS = 10
#: the packages whose Python bytecode atheris instruments for coverage
INSTRUMENTED = ["agent", "hal", "tests.fuzz.targets", "pyasn1", "tomllib"]
FINDING_PREFIXES = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")


def _one(target: str, seconds: int, runs: int | None, work: Path, memory_mb: int) -> None:
    """This process becomes one libFuzzer run; it never returns (libFuzzer exits)."""
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import atheris

    # the parsers log what they tolerate ("ignoring unparseable Retry-After ..."): millions of
    # lines would slow the run and fill the disk
    logging.disable(logging.CRITICAL)
    with atheris.instrument_imports(include=INSTRUMENTED):
        from tests.fuzz import targets
    if target not in targets.TARGETS:
        sys.exit(f"unknown fuzz target {target!r} (known: {', '.join(targets.TARGETS)})")

    def test_one_input(data: bytes) -> None:
        targets.check(target, data)

    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    args = [
        sys.argv[0],
        f"-max_total_time={seconds}",
        f"-timeout={TIMEOUT_SECONDS}",
        f"-rss_limit_mb={memory_mb}",
        f"-artifact_prefix={work}/",
        "-print_final_stats=1",
        "-max_len=16384",
    ]
    if runs is not None:
        args.append(f"-runs={runs}")
    args += [str(corpus), str(CORPUS / target)]
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


@dataclass
class Result:
    target: str
    returncode: int
    executions: int
    cov: int
    ft: int
    findings: list[str]
    log: Path
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.findings


def _figures(text: str) -> tuple[int, int, int]:
    executions = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    progress = re.findall(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)", text, re.MULTILINE)
    execs = int(executions[-1]) if executions else (int(progress[-1][0]) if progress else 0)
    cov, ft = (int(progress[-1][1]), int(progress[-1][2])) if progress else (0, 0)
    return execs, cov, ft


def fuzz(
    target: str,
    *,
    seconds: int,
    work_root: Path,
    runs: int | None = None,
    memory_mb: int = MEMORY_MB,
) -> Result:
    """One target in a child process; its figures and findings."""
    work = work_root / target
    work.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in work.iterdir()}
    log = work / "fuzz.log"
    cmd = [sys.executable, "-m", "tests.fuzz.run", "--one", target, "--seconds", str(seconds)]
    cmd += ["--work", str(work), "--memory-mb", str(memory_mb)]
    if runs is not None:
        cmd += ["--runs", str(runs)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
            timeout=seconds + 120,
        )
    elapsed = time.monotonic() - started
    text = log.read_text(errors="replace")
    findings = sorted(
        p.name
        for p in work.iterdir()
        if p.name not in before and p.name.startswith(FINDING_PREFIXES)
    )
    execs, cov, ft = _figures(text)
    return Result(target, proc.returncode, execs, cov, ft, findings, log, elapsed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*")
    parser.add_argument("--one", metavar="TARGET", help="run one target in this process")
    parser.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    parser.add_argument(
        "--runs", type=int, default=None, help="stop a target after this many inputs (a goal)"
    )
    parser.add_argument("--work", type=Path, default=ROOT / ".fuzz")
    parser.add_argument("--memory-mb", type=int, default=MEMORY_MB)
    args = parser.parse_args(argv)
    if args.one:
        _one(args.one, args.seconds, args.runs, args.work, args.memory_mb)
        return 0  # not reached
    from tests.fuzz.targets import TARGETS

    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)} (known: {', '.join(TARGETS)})")
    print(f"{'target':<20} {'executions':>12} {'exec/s':>8} {'cov':>6} {'ft':>7}  findings")
    failed = False
    for name in names:
        r = fuzz(
            name,
            seconds=args.seconds,
            work_root=args.work,
            runs=args.runs,
            memory_mb=args.memory_mb,
        )
        rate = int(r.executions / max(r.seconds, 0.001))
        what = ", ".join(r.findings) if r.findings else ("none" if r.ok else f"exit {r.returncode}")
        print(f"{name:<20} {r.executions:>12} {rate:>8} {r.cov:>6} {r.ft:>7}  {what}", flush=True)
        if not r.ok:
            failed = True
            print(f"  log: {r.log}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
