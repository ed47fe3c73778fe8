"""A device for end-to-end tests: its swtpm, state directory and config, pointed at our EST
server; `run` is the real CLI as a subprocess (which loads its own tpm2 provider)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hal.interfaces import KeyAlgorithm
from hal.tpm import TpmKeyStore
from tests.conftest import ROOT, provider_path
from tests.support.ca import pem
from tests.support.enroll_env import password_file, write_config
from tests.support.est_server import EstServer
from tests.support.swtpm import Swtpm


@dataclass
class Run:
    code: int
    out: str
    err: str


class Device:
    """A device: its swtpm, state dir and config, pointed at `est`."""

    def __init__(self, tmp_path: Path, tpm: Swtpm, est: EstServer) -> None:
        self.tmp_path = tmp_path
        self.tpm = tpm
        self.est = est
        self.state_dir = tmp_path / "state"
        self.config = tmp_path / "config.toml"
        self.est_keys: dict[str, Any] = {}
        self.configure()

    def configure(self, **est_keys: Any) -> None:
        self.est_keys.update(est_keys)
        write_config(
            self.config,
            state_dir=self.state_dir,
            est=self.est,
            tcti=self.tpm.tcti,
            provider=provider_path(),
            **self.est_keys,
        )

    def run(self, *args: str, timeout: float = 60) -> Run:
        """The CLI; `timeout` ends the test with TimeoutExpired if the process runs longer."""
        proc = subprocess.run(
            [sys.executable, "-m", "agent.cli", "--config", str(self.config), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Run(proc.returncode, proc.stdout, proc.stderr)

    def basic(self) -> None:
        self.configure(username="device", password_file=str(password_file(self.tmp_path)))

    def idevid(self) -> None:
        """A manufacturer IDevID: a key in this TPM with a certificate from the maker's CA."""
        keys = TpmKeyStore(tcti=self.tpm.tcti)
        blob = keys.generate(KeyAlgorithm.EC_P256)
        cert = self.est.issue_idevid(keys.public_key(blob))
        key_file = self.tmp_path / "idevid.tss2.pem"
        cert_file = self.tmp_path / "idevid.pem"
        key_file.write_bytes(blob)
        cert_file.write_bytes(pem(cert))
        self.configure(idevid_cert=str(cert_file), idevid_key=str(key_file))
