"""Asking the running service over its control socket. Standard library only (json, socket,
os, stat, tomllib), so `devid-agent status` against a running daemon starts in a few
milliseconds: tests/test_startup_imports.py keeps cryptography, tpm2_pytss, requests and pyasn1
out of this path.

`ask(path, op)` sends one request and returns its result, or raises `Unavailable` (no socket,
nobody answers, no answer in time: the service is not running or is stuck) or `Refused` (the
service answered with an error). The server must be root or the owner of `paths.state_dir`
(the service user), as the kernel says (SO_PEERCRED), so a socket planted by someone else is not
believed.

`fast_main` is the console entry point: `status [--json]` (with `--config` only) is answered from
the running service here; everything else, and any doubt, goes to the full CLI (agent.cli).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["Refused", "Unavailable", "ask", "fast_main", "lean_settings"]

SOCKET_NAME = "control.sock"
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
DEFAULT_CONFIG = "/etc/devid-agent/config.toml"
CONFIG_ENV = "DEVID_AGENT_CONFIG"
MAX_CONFIG_BYTES = 1024 * 1024

#: what the fast path learned before handing over to the full CLI (so it does not ask twice)
prior: Unavailable | Refused | None = None


class Unavailable(Exception):
    """The service did not answer. `state`: "absent" (no socket), "refused" (no one listens:
    a daemon that died), "timeout" (no answer in time), "forbidden" (the socket's mode keeps
    this user out), "error" (anything else)."""

    def __init__(self, state: str, detail: str) -> None:
        super().__init__(detail)
        self.state = state
        self.detail = detail


class Refused(Exception):
    """The service answered with an error."""

    def __init__(self, code: str, message: str, disposition: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.disposition = disposition


def ask(
    path: str,
    op: str,
    *,
    timeout: float,
    trusted_uids: frozenset[int] | None = None,
    request_id: str | int = 1,
) -> dict[str, Any]:
    """One request over the socket at `path`; its result, or Unavailable/Refused."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise Unavailable("absent", f"no control socket at {path}") from None
        except ConnectionRefusedError:
            raise Unavailable("refused", f"nothing listens on {path} (a stale socket)") from None
        except TimeoutError:
            raise Unavailable("timeout", f"{path} did not accept within {timeout:g} s") from None
        except PermissionError:
            raise Unavailable("forbidden", f"this user may not connect to {path}") from None
        except OSError as e:
            raise Unavailable("error", f"cannot connect to {path}: {e.strerror or e}") from None
        if trusted_uids is not None:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            uid = struct.unpack("3i", creds)[1]
            if uid not in trusted_uids:
                raise Unavailable(
                    "error", f"{path} is served by uid {uid}, not by root or the service user"
                )
        line = json.dumps({"v": 1, "id": request_id, "op": op}).encode() + b"\n"
        data = bytearray()
        try:
            # it may have answered at once and closed (busy): its answer may still be there
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(line)
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_RESPONSE_BYTES:
                    raise Unavailable("error", f"{path}: answer longer than {MAX_RESPONSE_BYTES}")
        except TimeoutError:
            raise Unavailable("timeout", f"{path} did not answer within {timeout:g} s") from None
        except OSError as e:
            raise Unavailable("error", f"{path}: {e.strerror or e}") from None
    finally:
        sock.close()
    try:
        answer = json.loads(bytes(data))
    except (ValueError, RecursionError):
        raise Unavailable("error", f"{path} answered something that is not JSON") from None
    if not isinstance(answer, dict) or answer.get("v") != 1:
        raise Unavailable("error", f"{path} answered in an unknown protocol version")
    result = answer.get("result")
    if answer.get("ok") is True and isinstance(result, dict):
        return result
    error = answer.get("error")
    if not isinstance(error, dict):
        raise Unavailable("error", f"{path} answered without a result or an error")
    raise Refused(
        str(error.get("code", "")), str(error.get("message", "")), str(error.get("disposition", ""))
    )


def trusted_server_uids(state_dir: str) -> frozenset[int]:
    """Root and the owner of the service's state directory (the service user)."""
    try:
        return frozenset({0, os.stat(state_dir).st_uid})
    except OSError:
        return frozenset({0, os.geteuid()})


# -- the fast path for `status` -------------------------------------------------------------------


def _status_args(argv: Sequence[str]) -> tuple[str | None, bool] | None:
    """(--config, --json) when argv is exactly `status` with those options, else None."""
    config: str | None = None
    as_json = seen = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config" and args:
            config = args.pop(0)
        elif arg.startswith("--config="):
            config = arg.partition("=")[2]
        elif arg == "status" and not seen:
            seen = True
        elif arg == "--json" and seen:
            as_json = True
        else:
            return None
    if not seen or config == "":
        return None
    return config, as_json


def lean_settings(config_file: str) -> tuple[bool, str, str, float] | None:
    """(control.enabled, paths.run_dir, paths.state_dir, control.request_timeout_seconds) read
    with tomllib alone; None when anything is unusual (the full CLI then says what)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

    try:
        fd = os.open(config_file, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            raw = os.read(fd, MAX_CONFIG_BYTES + 1)
        finally:
            os.close(fd)
        if len(raw) > MAX_CONFIG_BYTES:
            return None
        table = tomllib.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    paths, control = table.get("paths", {}), table.get("control", {})
    if not isinstance(paths, dict) or not isinstance(control, dict):
        return None
    enabled = control.get("enabled", True)
    run_dir = paths.get("run_dir", "/run/devid-agent")
    state_dir = paths.get("state_dir", "/var/lib/devid-agent")
    timeout = control.get("request_timeout_seconds", 5.0)
    if not isinstance(enabled, bool) or not isinstance(run_dir, str) or not run_dir.startswith("/"):
        return None
    if not isinstance(state_dir, str) or isinstance(timeout, bool):
        return None
    if not isinstance(timeout, (int, float)) or not 0.1 <= timeout <= 60:
        return None
    return enabled, run_dir, state_dir, float(timeout)


def status_timeout(request_timeout: float) -> float:
    """How long `status` waits for the service: a turn of the loop may be a renewal in progress."""
    return max(2.0 * request_timeout, 5.0)


def _fast_status(argv: Sequence[str]) -> int | None:
    global prior
    parsed = _status_args(argv)
    if parsed is None:
        return None
    config, as_json = parsed
    path = config if config is not None else (os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    settings = lean_settings(path)
    if settings is None or not settings[0]:
        return None
    _enabled, run_dir, state_dir, timeout = settings
    try:
        result = ask(
            os.path.join(run_dir, SOCKET_NAME),
            "status",
            timeout=status_timeout(timeout),
            trusted_uids=trusted_server_uids(state_dir),
        )
        code, text, model = result["code"], result["text"], result["status"]
        if not isinstance(code, int) or not isinstance(text, str) or not isinstance(model, dict):
            raise Unavailable("error", "the service's status answer is incomplete")
    except (Unavailable, Refused) as e:
        prior = e
        return None
    except KeyError:
        prior = Unavailable("error", "the service's status answer is incomplete")
        return None
    out = json.dumps(model, indent=2, sort_keys=True) if as_json else text
    try:
        sys.stdout.write(out + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    return code


def fast_main(argv: Sequence[str] | None = None) -> int:
    """The `devid-agent` entry point: `status` from the running service, else the full CLI."""
    args = list(sys.argv[1:] if argv is None else argv)
    code = _fast_status(args)
    if code is not None:
        return code
    from agent.cli import main

    return main(args)
