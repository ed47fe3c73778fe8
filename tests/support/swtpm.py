"""A real software TPM (swtpm) on loopback for tests, benchmarks and the demo."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support import procs


class Swtpm:
    """One swtpm socket TPM with its state in `state_dir`. Restartable: the state survives."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self) -> Swtpm:
        if shutil.which("swtpm") is None:
            raise RuntimeError("swtpm is not installed: run `make setup`")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):  # a port found free can be taken before swtpm binds it
            self.port = procs.free_port(2)
            self.proc = procs.start(
                [
                    "swtpm", "socket", "--tpm2",
                    "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                    "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                    "--tpmstate", f"dir={self.state_dir}",
                    "--flags", "not-need-init,startup-clear",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                procs.wait_for_port(self.port, proc=self.proc)
                return self
            except BaseException as e:  # never leave a half-started swtpm running
                exited = self.proc.poll() is not None
                self.stop()
                if not (exited and isinstance(e, RuntimeError)) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc)
            self.proc = None

    def restart(self) -> None:
        """Power-cycle: stop the process, start a new one on the same state (new port)."""
        self.stop()
        self.start()
