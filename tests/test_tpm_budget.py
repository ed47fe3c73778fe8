"""The TPM object budget on a bare swtpm (3 transient slots, no resource manager).

A long-lived TLS context with the TPM identity (what the MQTT channel holds) stays open in another
process while `renew` runs: the EST connection's context and the CSR signer (which, loading, takes
2 slots: parent and key) must fit beside it. Then a fresh context with the new
identity (the hot swap) must fit beside the old one. Leaked objects are reported in one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from hal.tpm import transient_objects
from tests.conftest import ROOT, provider_path
from tests.support.device import Device

HOLDER = """
import ssl, sys
from hal.openssl_provider import load_tpm2_provider
load_tpm2_provider(sys.argv[1], tcti=sys.argv[2])
def context(directory):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(directory + "/cert.pem", directory + "/key.tss2.pem")
    return ctx
held = context(sys.argv[3])
print("holding", flush=True)
for line in sys.stdin:          # "swap DIR": a second context beside the first, then drop the first
    fresh = context(line.split()[1])
    held = fresh
    print("swapped", flush=True)
"""


def generation(device: Device, n: int) -> str:
    return str((device.state_dir / "identity" / f"gen-{n}").resolve())


def test_renew_and_hot_swap_fit_beside_a_long_lived_tls_context(device: Device) -> None:
    assert device.run("enroll").code == 0
    assert transient_objects(device.tpm.tcti) == (0, 3)  # every context flushed, max 3
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(provider_path()), device.tpm.tcti,
         generation(device, 1)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == "holding\n"
        assert transient_objects(device.tpm.tcti)[0] == 1
        renewed = device.run("renew")  # signer 2 (before connecting), then EST context 2 -> 1
        assert renewed.code == 0, renewed.err
        assert "renewed: generation 2" in renewed.out
        assert transient_objects(device.tpm.tcti)[0] == 1  # renew left nothing behind
        holder.stdin.write(f"swap {generation(device, 2)}\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "swapped\n"  # old 1 + new load 2 = 3
        assert transient_objects(device.tpm.tcti)[0] == 1
    finally:
        holder.kill()
        holder.communicate()  # reaps it and closes its pipes


LEAKER = """
import sys
from tpm2_pytss import ESAPI
from tpm2_pytss.tsskey import TSSPrivKey
e = ESAPI(sys.argv[1])
key = TSSPrivKey.from_pem(open(sys.argv[2], "rb").read())
handles = [key.load(e) for _ in range(int(sys.argv[3]))]
print("loaded", flush=True)
sys.stdin.read()
"""


def test_leaked_objects_are_reported_in_one_line_with_the_cause_and_the_fix(
    device: Device,
) -> None:
    assert device.run("enroll").code == 0
    key = device.state_dir / "identity" / "current" / "key.tss2.pem"
    leaker = subprocess.Popen(
        [sys.executable, "-c", LEAKER, device.tpm.tcti, str(key), "2"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert leaker.stdout is not None and leaker.stdout.readline() == "loaded\n"
    finally:
        os.kill(leaker.pid, signal.SIGKILL)  # swtpm keeps what it held: nothing flushes it
        leaker.communicate()
    assert transient_objects(device.tpm.tcti) == (2, 3)
    before = sorted(p.name for p in (device.state_dir / "identity").iterdir())
    failed = device.run("renew")
    assert failed.code == 74
    lines = failed.err.strip().splitlines()
    assert len(lines) == 1, failed.err  # no raw WARNING:esys / ERROR:esys lines
    assert "no free object slot" in lines[0] and "/dev/tpmrm0" in lines[0]
    assert "tpm2_flushcontext -t" in lines[0]
    assert sorted(p.name for p in (device.state_dir / "identity").iterdir()) == before
