"""The control socket against a real `devid-agent run` (printed, never asserted):

1. `devid-agent status` answered by the running service: whole-process wall time of the console
   entry point (`.venv/bin/devid-agent`, what an operator runs), median of N, as a ratio to
   `.venv/bin/python -c pass` measured in the same run. Goal: <= 2.5x.
2. 1,000 `status` requests from 10 concurrent clients (threads, one connection per request, as
   the CLI does): p50 and p99 latency, errors. Goal: 0 errors.

The service runs with software keys against the test EST server (no TPM): what is measured is
the socket and the status path, not key generation.

Run: .venv/bin/python bench/bench_control.py [--runs 30] [--requests 1000] [--clients 10]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.control.client import ask  # noqa: E402
from tests.support.est_server import EstServer  # noqa: E402

GOAL = 2.5
ENTRY = Path(sys.executable).parent / "devid-agent"


def wall(argv: list[str], runs: int, *, expect: int | None = None) -> float:
    samples = []
    for _ in range(runs + 1):  # one warm-up run (page cache, .pyc)
        started = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True)
        samples.append(time.perf_counter() - started)
        if expect is not None and proc.returncode != expect:
            raise SystemExit(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.decode()}")
    return statistics.median(samples[1:])


def config(root: Path, est: EstServer) -> Path:
    path = root / "config.toml"
    path.write_text(
        f'[device]\nid = "gw-bench"\n[paths]\nstate_dir = "{root / "state"}"\n'
        f'run_dir = "{root / "run"}"\n[keys]\nstore = "software"\n'
        f'[est]\nurl = "{est.url}"\ntrust_anchor = "{est.ca_file}"\n'
    )
    return path


def load(sock: str, requests: int, clients: int) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = [0]
    kinds: dict[str, int] = {}
    lock = threading.Lock()
    share = requests // clients

    def client() -> None:
        mine = []
        for _ in range(share):
            started = time.perf_counter()
            try:
                result = ask(sock, "status", timeout=30)
                if "code" not in result:
                    raise ValueError("no code")
            except Exception as e:
                with lock:
                    errors[0] += 1
                    kind = f"{type(e).__name__}: {e}"[:80]
                    kinds[kind] = kinds.get(kind, 0) + 1
                continue
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for kind, count in sorted(kinds.items()):
        print(f"  error x{count}: {kind}")
    return latencies, errors[0]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-control-") as tmp:
        root = Path(tmp)
        with EstServer(root / "est") as est:
            path = config(root, est)
            log = open(root / "daemon.log", "wb")  # noqa: SIM115
            env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
            daemon = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "--config", str(path), "run"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                sock = str(root / "run" / "control.sock")
                deadline = time.monotonic() + 60
                while True:
                    with contextlib.suppress(Exception):  # not up yet
                        if ask(sock, "status", timeout=5)["code"] == 0:
                            break
                    if time.monotonic() > deadline or daemon.poll() is not None:
                        raise SystemExit((root / "daemon.log").read_text()[-2000:])
                    time.sleep(0.05)
                reference = wall([sys.executable, "-c", "pass"], args.runs)
                median = wall([str(ENTRY), "--config", str(path), "status"], args.runs, expect=0)
                full = wall(
                    [sys.executable, "-m", "agent.cli", "--config", str(path), "status"],
                    args.runs,
                    expect=0,
                )
                ratio = median / reference
                verdict = "meets" if ratio <= GOAL else "MISSES"
                print(f"status from the running service, whole process, median of {args.runs}")
                print(f"  {'python -c pass':34s} {reference * 1e3:7.1f} ms  1.0x")
                print(f"  {'devid-agent status (entry point)':34s} {median * 1e3:7.1f} ms  "
                      f"{ratio:4.1f}x  ({verdict} <= {GOAL}x)")  # fmt: skip
                print(f"  {'python -m agent.cli status':34s} {full * 1e3:7.1f} ms  "
                      f"{full / reference:4.1f}x  (the full CLI, for comparison)")  # fmt: skip
                started = time.perf_counter()
                latencies, errors = load(sock, args.requests, args.clients)
                elapsed = time.perf_counter() - started
                latencies.sort()
                p50 = latencies[len(latencies) // 2] if latencies else float("nan")
                p99 = latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan")
                print(f"{args.requests} status requests from {args.clients} concurrent clients "
                      f"in {elapsed:.2f} s: p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms, "
                      f"errors {errors} (goal 0)")  # fmt: skip
            finally:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(30)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
                log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
