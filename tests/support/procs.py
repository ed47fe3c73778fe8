"""Start and stop helper servers for tests and the demo: free ports, readiness polls, PIDs."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def free_port(count: int = 1) -> int:
    """A port P on 127.0.0.1 such that P..P+count-1 were all free a moment ago."""
    for _ in range(200):
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(socket.socket())
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port + count > 65535:
                continue
            try:
                for extra in range(1, count):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port + extra))
            except OSError:
                continue
            return int(port)
    raise RuntimeError("no free port range found")


def wait_for_port(
    port: int, *, proc: subprocess.Popen[bytes] | None = None, timeout: float = 10.0
) -> None:
    """Poll until 127.0.0.1:port accepts a connection (never a blind sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process {proc.args!r} exited with {proc.returncode} before listening"
            )
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.002)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, even by SIGKILL, so a killed test
    run leaves no server behind (prctl PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def start(args: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
    """Start a server in its own process group, so stop() can end it and its children by PID;
    it also ends if this process dies without stopping it."""
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        list(args), start_new_session=True, preexec_fn=_die_with_parent, **kwargs
    )


def stop(proc: subprocess.Popen[bytes], *, timeout: float = 5.0) -> None:
    """Stop a process started by start(): SIGTERM its group, then SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


_TICK = os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """The resident memory of process `pid` (VmRSS, KiB), for the benches."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) process `pid` has used so far, for the benches."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK
