"""A real `devid-agent run` as an unprivileged service user, for the control socket's tests and
bench: a world-traversable directory under /tmp (pytest's tmp_path is root's alone) holding the
service's state directory and run directory (owned by the service uid, as systemd's
StateDirectory= and RuntimeDirectory= make them), a config readable by everyone, and our EST
server (no authentication, software keys: no TPM needed). Peers of other uids are forked
children that drop to their uid, gid and groups, then speak to the socket (no exec).

Needs root (to play the other uids).
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.support.est_server import EstOptions, EstServer

SERVICE_UID = 4243
READER_UID = 4244
OTHER_UID = 4245


CAP_DAC_READ_SEARCH = 2
_PR_SET_KEEPCAPS = 8
_CAPABILITY_VERSION_3 = 0x20080522


def drop_to(uid: int, gid: int, groups: list[int], *, read_search: bool = False) -> None:
    """Become uid/gid/groups. With `read_search` keep only CAP_DAC_READ_SEARCH, so a process
    that imports modules lazily can still read the interpreter's library, which lives under
    /root here (0700). It grants reading files and searching directories, never writing: it does
    not open a 0660 socket (connect needs write permission), so the socket's mode still decides."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if read_search and libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if read_search:
        header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
        bit = 1 << CAP_DAC_READ_SEARCH
        data = (ctypes.c_uint32 * 6)(bit, bit, 0, 0, 0, 0)  # effective, permitted, inheritable
        if libc.capset(header, data) != 0:
            raise OSError(ctypes.get_errno(), "capset")
    assert os.geteuid() == uid


def readers_group() -> tuple[str, int]:
    """An existing group no test uid is in by default (Debian's `users`)."""
    g = grp.getgrnam("users")
    return g.gr_name, g.gr_gid


@contextlib.contextmanager
def world() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="devid-ctl-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


class ServiceUnderTest:
    """`devid-agent run` as SERVICE_UID, with its EST server."""

    def __init__(
        self,
        base: Path,
        *,
        readers: bool = True,
        est_url: str | None = None,
        lifetime: int = 30 * 86400,
        control: dict[str, Any] | None = None,
    ) -> None:
        self.base = base
        self.state_dir = base / "state"
        self.run_dir = base / "run"
        self.socket = self.run_dir / "control.sock"
        self.config = base / "config.toml"
        self.log = base / "daemon.log"
        for d, mode in ((self.state_dir, 0o700), (self.run_dir, 0o755)):
            d.mkdir(mode=mode, exist_ok=True)
            os.chmod(d, mode)
            os.chown(d, SERVICE_UID, SERVICE_UID)
        self.est = EstServer(base / "est", EstOptions(cert_lifetime_seconds=lifetime))
        self.est.__enter__()
        os.chmod(base / "est", 0o755)
        os.chmod(self.est.ca_file, 0o644)
        self.est_url = est_url
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.write_config(readers=readers, control=control)

    def write_config(self, *, readers: bool = True, control: dict[str, Any] | None = None) -> None:
        settings: dict[str, Any] = {"request_timeout_seconds": 1.0, **(control or {})}
        if readers:
            settings.setdefault("readers_group", readers_group()[0])
        lines = [
            "[device]", 'id = "gw-ctl"',
            "[paths]", f'state_dir = "{self.state_dir}"', f'run_dir = "{self.run_dir}"',
            "[keys]", 'store = "software"',
            "[est]", f'url = "{self.est_url or self.est.url}"',
            f'trust_anchor = "{self.est.ca_file}"', "retry_after_min_seconds = 0",
            "connect_timeout_seconds = 2.0", "read_timeout_seconds = 5.0",
            "[renewal]", "retry_min_seconds = 30.0", "retry_max_seconds = 60.0",
            "[control]",
        ]  # fmt: skip
        for key, value in settings.items():
            shown = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
            lines.append(f"{key} = {shown}")
        self.config.write_text("\n".join(lines) + "\n")
        os.chmod(self.config, 0o644)

    def start(self) -> ServiceUnderTest:
        """Fork, become the service user, run the real CLI's `run` in the child (no exec: the
        interpreter may live where that uid cannot reach, as it does here)."""
        log = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.dup2(log, 1)
                os.dup2(log, 2)
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
                os.setsid()
                drop_to(SERVICE_UID, SERVICE_UID, [readers_group()[1]], read_search=True)
                for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                    os.environ.pop(name, None)
                from agent.cli import main

                code = main(["--config", str(self.config), "run"])
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(log)
        self.pid = pid
        return self

    def running(self) -> bool:
        if self.pid is None or self.exit_code is not None:
            return False
        done, status = os.waitpid(self.pid, os.WNOHANG)
        if done:
            self.exit_code = os.waitstatus_to_exitcode(status)
            return False
        return True

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, check: Callable[[], bool], what: str, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while not check():
            assert self.running(), (
                f"the daemon exited while waiting for {what}:\n{self.text()[-3000:]}"
            )
            assert time.monotonic() < deadline, f"no {what} in {seconds} s:\n{self.text()[-3000:]}"
            time.sleep(0.05)

    def wait_serving(self) -> None:
        self.wait_for(lambda: "control socket" in self.text() and self.socket.exists(), "socket")

    def wait_enrolled(self) -> None:
        """The enrollment over, as the service sees it (its outcome recorded), not only the
        identity in place (its attempt process may still be at work)."""
        self.wait_for(lambda: "is current: serial" in self.text(), "enrollment")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.pid is None:
            return None
        if self.running():
            os.kill(self.pid, sig)
            deadline = time.monotonic() + 30
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.running():
                os.kill(self.pid, signal.SIGKILL)
                self.exit_code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.exit_code

    def close(self) -> None:
        self.stop()
        self.est.__exit__(None, None, None)


def raw(path: Path, data: bytes, *, timeout: float = 30) -> bytes:
    """Send `data`, read until the server closes or a line ends."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        with contextlib.suppress(BrokenPipeError):  # a server refusing ("busy") may close first
            s.sendall(data)
        got = b""
        while not got.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def request(path: Path, op: str, *, request_id: object = 1, timeout: float = 30) -> dict[str, Any]:
    line = json.dumps({"v": 1, "id": request_id, "op": op}).encode() + b"\n"
    answer: dict[str, Any] = json.loads(raw(path, line, timeout=timeout))
    return answer


def as_peer(
    uid: int, gid: int, groups: list[int], fn: Callable[[], object], *, read_search: bool = False
) -> Any:
    """Run `fn` in a forked child that became uid/gid/groups; its JSON-able return value, or
    {"exception": "Type: message"}."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            drop_to(uid, gid, groups, read_search=read_search)
            try:
                result: Any = fn()
            except Exception as e:
                result = {"exception": f"{type(e).__name__}: {e}"}
            os.write(write_end, json.dumps(result).encode())
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_end)
    data = b""
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data) if data else {"exception": "the child died"}


def cli_as(uid: int, gid: int, groups: list[int], config: Path, *args: str) -> dict[str, Any]:
    """The real CLI (`agent.cli.main`) in a forked child of another uid: {"code", "out", "err"}."""

    def run() -> dict[str, Any]:
        import io

        from agent.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--config", str(config), *args])
        return {"code": code, "out": out.getvalue(), "err": err.getvalue()}

    result: dict[str, Any] = as_peer(uid, gid, groups, run, read_search=uid != 0)
    return result


def audit_lines(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
