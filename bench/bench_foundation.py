"""Foundation figures on swtpm (printed, never asserted):

- TPM ECC P-256 key generation + CSR signed in the TPM (goal: median <= 25 ms)
- mutual-TLS handshake with a TPM key through the tpm2 provider (goal: median <= 15 ms)

Run: .venv/bin/python bench/bench_foundation.py [--runs 50]
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: E402

from agent.pki import SubjectSpec, build_csr  # noqa: E402
from agent.tls import client_context  # noqa: E402
from hal.interfaces import KeyAlgorithm  # noqa: E402
from hal.openssl_provider import load_tpm2_provider  # noqa: E402
from hal.tpm import TpmKeyStore  # noqa: E402
from tests.conftest import provider_path  # noqa: E402
from tests.support.ca import TestCA, pem  # noqa: E402
from tests.support.swtpm import Swtpm  # noqa: E402
from tests.support.tls_server import MutualTlsServer, handshake  # noqa: E402


def report(name: str, samples: list[float], goal_ms: float) -> None:
    ms = sorted(s * 1000 for s in samples)
    median = statistics.median(ms)
    p90 = ms[max(0, math.ceil(0.9 * len(ms)) - 1)]  # nearest rank
    verdict = "meets" if median <= goal_ms else "MISSES"
    print(
        f"{name}: median {median:.2f} ms, p90 {p90:.2f} ms, "
        f"min {ms[0]:.2f} ms, max {ms[-1]:.2f} ms over {len(ms)} runs "
        f"({verdict} goal <= {goal_ms:g} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    runs = parser.parse_args().runs
    if runs < 1:
        parser.error("--runs must be at least 1")
    provider = str(provider_path())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tpm = Swtpm(work / "tpm").start()
        try:
            store = TpmKeyStore(tcti=tpm.tcti)
            subject = SubjectSpec(common_name="bench-device", san_uris=("urn:bench:1",))
            keygen_csr = []
            for _ in range(runs):
                start = time.perf_counter()
                blob = store.generate(KeyAlgorithm.EC_P256)
                with store.signer(blob) as key:
                    build_csr(key, subject)
                keygen_csr.append(time.perf_counter() - start)
            report("TPM EC P-256 keygen + CSR", keygen_csr, 25)

            load_tpm2_provider(provider, tcti=tpm.tcti)
            ca = TestCA()
            ca_file = ca.write_cert(work / "ca.pem")
            server_cert, server_key = ca.server_identity(work)
            (work / "key.tss2.pem").write_bytes(blob)
            cert = ca.issue(
                store.public_key(blob),  # type: ignore[arg-type]
                subject="bench-device",
                eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
            )
            (work / "cert.pem").write_bytes(pem(cert))
            ctx = client_context(
                ca_file=ca_file, cert_file=work / "cert.pem", key_file=work / "key.tss2.pem"
            )
            with MutualTlsServer(cert=server_cert, key=server_key, client_ca=ca_file) as server:
                handshake(ctx, server.port)  # warm-up
                for version in ("1.3", "1.2"):
                    ctx = client_context(
                        ca_file=ca_file,
                        cert_file=work / "cert.pem",
                        key_file=work / "key.tss2.pem",
                        max_version=version,
                    )
                    samples = []
                    for _ in range(runs):
                        start = time.perf_counter()
                        handshake(ctx, server.port)
                        samples.append(time.perf_counter() - start)
                    report(f"mutual-TLS {version} handshake, TPM EC P-256 key", samples, 15)
            # Free the contexts (and their TPM key objects) while the TPM is still there.
            del ctx
            gc.collect()
        finally:
            tpm.stop()


if __name__ == "__main__":
    main()
