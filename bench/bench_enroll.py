"""EST enrollment latency against our local EST server with swtpm keys (printed, never asserted).

Median of N runs, broken down into key generation (in the TPM), CSR (built and signed in the
TPM), TLS handshake and server time of the enrollment connection; "other" is the rest: /cacerts
and /csrattrs round trips, response validation, writing the generation (fsync) and the swap.
Goal: whole enroll <= 60 ms with swtpm.

Run: .venv/bin/python bench/bench_enroll.py [--runs 30]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import wiring  # noqa: E402
from agent.config import parse_config  # noqa: E402
from agent.enroll import EnrollResult  # noqa: E402
from hal.tpm import TpmKeyStore  # noqa: E402
from tests.support.enroll_env import config_text, password_file  # noqa: E402
from tests.support.est_server import EstOptions, EstServer  # noqa: E402
from tests.support.swtpm import Swtpm  # noqa: E402

FIELDS = ("keygen", "csr", "handshake", "server", "total")


def provider() -> Path:
    return Path((ROOT / ".deps" / "tpm2-provider.path").read_text().strip()).resolve()


def scenario(
    name: str, work: Path, tpm: Swtpm, options: EstOptions, runs: int, renew: bool, **keys: object
) -> None:
    with EstServer(work / name / "est", options) as est:
        text = config_text(
            state_dir=work / name / "state",
            est=est,
            tcti=tpm.tcti,
            provider=provider(),
            generations_kept=2,
            **keys,
        )
        config = parse_config(text)
        enroller = wiring.enroller(config, key_store=TpmKeyStore(tcti=tpm.tcti))
        enroller.enroll(force=True)  # warm-up (imports, first TPM primary)
        results: list[EnrollResult] = []
        for _ in range(runs):
            results.append(enroller.renew() if renew else enroller.enroll(force=True))
    medians = {f: statistics.median(getattr(r.timings, f) for r in results) * 1e3 for f in FIELDS}
    other = medians["total"] - sum(medians[f] for f in FIELDS[:-1])
    via = f"{results[-1].tls_version}{', PoP' if results[-1].proof_of_possession else ''}"
    print(
        f"{name:<34} {via:<14} "
        + "  ".join(f"{f} {medians[f]:6.1f}" for f in FIELDS[:-1])
        + f"  other {other:5.1f}  | total {medians['total']:6.1f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-enroll-") as tmp:
        work = Path(tmp)
        tpm = Swtpm(work / "tpm").start()
        try:
            from hal.openssl_provider import load_tpm2_provider

            load_tpm2_provider(str(provider()), tcti=tpm.tcti)
            print(f"EST enroll, median of {args.runs} (ms), swtpm ECC P-256, loopback server")
            scenario("enroll", work, tpm, EstOptions(), args.runs, renew=False)
            scenario(
                "enroll, Basic after 401, PoP",
                work,
                tpm,
                EstOptions(auth="basic", tls12_only=True, pop_required=True),
                args.runs,
                renew=False,
                username="device",
                password_file=str(password_file(work)),
            )
            scenario("renew, mTLS with the TPM key", work, tpm, EstOptions(), args.runs, renew=True)
        finally:
            tpm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
