"""The service as a real process in tests: `devid-agent run` started with a test NOTIFY_SOCKET,
its log, and waits on facts (a deadline turns a hang into a failure; nothing asserts speed).
The `notify` and `services` fixtures (tests/conftest.py) make and clean up these."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import ROOT
from tests.support.device import Device

#: with the server back-dating notBefore by 60 s, a 105 s certificate at 60% of its lifetime is
#: due 3 s after it was issued: rotations follow each other by themselves, quickly
LIFETIME = 105
FAST = {"window_start_fraction": 0.6, "window_end_fraction": 0.6, "retry_min_seconds": 1.0,
        "retry_max_seconds": 2.0}  # fmt: skip


class Notifications:
    """Everything sent to our NOTIFY_SOCKET, with when it arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().split("\n"):
                self.messages.append((time.monotonic(), line))

    def lines(self) -> list[str]:
        return [m for _, m in list(self.messages)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def configure(device: Device, **renewal: float) -> None:
    text = device.config.read_text()
    text += "[renewal]\n" + "".join(f"{k} = {v}\n" for k, v in {**FAST, **renewal}.items())
    device.config.write_text(text)


class Service:
    def __init__(self, device: Device, notify: Notifications, watchdog_usec: int | None) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
        env["NOTIFY_SOCKET"] = str(notify.path)
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.log = device.tmp_path / "daemon.log"
        self.out = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "--config", str(device.config), "run"],
            cwd=ROOT, env=env, stdout=self.out, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send `sig`; the process must end within `timeout` (else TimeoutExpired)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.out.close()
        return code


def wait_for(check: Callable[[], bool], what: str, service: Service, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert service.proc.poll() is None, (
            f"the daemon exited while waiting for {what}:\n" + (service.text()[-3000:])
        )
        assert time.monotonic() < deadline, (
            f"no {what} within {seconds} s:\n{service.text()[-3000:]}"
        )
        time.sleep(0.05)


def generations(device: Device) -> list[int]:
    root = device.state_dir / "identity"
    if not root.exists():
        return []
    return sorted(int(p.name[4:]) for p in root.iterdir() if p.name.startswith("gen-"))


def current(device: Device) -> int | None:
    link = device.state_dir / "identity" / "current"
    return int(os.readlink(link)[4:]) if link.is_symlink() else None


def state(device: Device) -> dict[str, object]:
    path = device.state_dir / "renewal-state.json"
    return json.loads(path.read_text()) if path.exists() else {}
