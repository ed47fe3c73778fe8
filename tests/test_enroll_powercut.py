"""Power cuts at every crash point of `enroll` and `renew` (hal.faults: before and after each
write, fsync and rename of the identity store, the pending request and the CA certificates).

After each cut `identity/current` is absent (first enrollment only) or a complete generation
whose key loads in the TPM, signs, and matches its certificate; no TPM object is left loaded
on the swtpm; and the next run finishes the job. Deterministic: every point, in order, once.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent import wiring
from agent.config import load_config
from hal.faults import CRASH_EXIT, ENV
from hal.tpm import TpmKeyStore, transient_objects
from tests.conftest import ROOT
from tests.support.device import Device

MAX_POINTS = 200


def run(device: Device, command: str, crash_at: int | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if crash_at is not None:
        env[ENV] = str(crash_at)
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(device.config), command],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def check_current(device: Device, *, required: bool) -> int | None:
    """`current` is a complete identity whose TPM key signs for its certificate."""
    store = wiring.identity_store(load_config(device.config))
    identity = store.current()
    if identity is None:
        assert not required, "the identity is gone"
        return None
    keys = TpmKeyStore(tcti=device.tpm.tcti)
    blob = store.key_blob(identity)
    assert keys.public_key(blob) == identity.certificate.public_key()
    with keys.signer(blob) as key:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        signature = key.sign(b"still works", ec.ECDSA(hashes.SHA256()))
    public = identity.certificate.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, b"still works", ec.ECDSA(hashes.SHA256()))
    assert (identity.directory / "chain.pem").is_file()
    assert transient_objects(device.tpm.tcti)[0] == 0, "the cut left a TPM object loaded"
    return identity.generation


@pytest.mark.parametrize("command", ["enroll", "renew"])
def test_a_power_cut_at_every_crash_point(device: Device, command: str) -> None:
    if command == "renew":
        assert run(device, "enroll", None).returncode == 0
    points: list[str] = []
    for n in range(1, MAX_POINTS):
        if command == "enroll":  # start every first enrollment from nothing
            for path in sorted(device.state_dir.rglob("*"), reverse=True):
                path.unlink() if not path.is_dir() or path.is_symlink() else path.rmdir()
        before = check_current(device, required=command == "renew")
        cut = run(device, command, n)
        if cut.returncode == 0:
            break  # fewer than n points: every one has been cut
        assert cut.returncode == CRASH_EXIT, cut.stderr
        points.append(cut.stderr.strip().rsplit(": ", 1)[-1])
        after = check_current(device, required=command == "renew")
        if before is None:  # a first enrollment: nothing, or the whole new identity
            assert after in (None, 1)
        else:  # a renewal: the old identity, or the whole new one
            assert after is not None and after >= before
        finished = run(device, command, None)
        assert finished.returncode == 0, finished.stderr
        check_current(device, required=True)
    else:
        raise AssertionError(f"{command} still crashing after {MAX_POINTS} points")
    kinds = {point.split()[0] for point in points}
    assert {"write", "fsync", "rename", "symlink"} <= kinds, kinds
    assert any("current" in point for point in points)  # the swap itself was cut
