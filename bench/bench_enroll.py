"""EST enrollment latency against our local EST server with swtpm keys (printed, never asserted).

Median of N runs, broken down into key generation (in the TPM), CSR (built and signed in the
TPM), TLS handshake and server time of the enrollment connection; "other" is the rest: /cacerts
and /csrattrs round trips, response validation, writing the generation (fsync) and the swap.
Goal: whole enroll <= 60 ms with swtpm.

Then whole processes, as an operator sees them (issue 8): `devid-agent enroll --force` with a
software key and with a TPM key, and `renew`, against `curl` posting a ready-made base64
PKCS#10 to /simpleenroll with the same TLS anchor and Basic credentials; median wall time of N
runs each, in the same run on the same server (keep-alive, Basic after a 401 challenge), with
the ratio to curl and the requests and TLS connections the server saw per operation.
Goal: <= 2.5x curl; enroll 2 requests on 1 connection with a stored anchor, renew 1.

Run: .venv/bin/python bench/bench_enroll.py [--runs 30]
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import wiring  # noqa: E402
from agent.config import parse_config  # noqa: E402
from agent.enroll import EnrollResult  # noqa: E402
from hal.tpm import TpmKeyStore  # noqa: E402
from tests.conftest import provider_path  # noqa: E402
from tests.support.enroll_env import config_text, password_file  # noqa: E402
from tests.support.est_server import EstOptions, EstServer  # noqa: E402
from tests.support.swtpm import Swtpm  # noqa: E402

FIELDS = ("keygen", "csr", "handshake", "server", "total")


def scenario(
    name: str, work: Path, tpm: Swtpm, options: EstOptions, runs: int, renew: bool, **keys: object
) -> None:
    with EstServer(work / name / "est", options) as est:
        text = config_text(
            state_dir=work / name / "state",
            est=est,
            tcti=tpm.tcti,
            provider=provider_path(),
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


def _process_runs(
    label: str, command: list[str], est: EstServer, runs: int, env: dict[str, str]
) -> tuple[float, float, float]:
    """Median wall seconds of `command` run `runs` times, and requests and connections per run."""
    times: list[float] = []
    requests = connections = 0
    for _ in range(runs):
        est.records.clear()
        before = est.connections
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, env=env, check=False)
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"{label}: exit {done.returncode}: {done.stderr.decode()[-300:]}")
        requests += len(est.records)
        connections += est.connections - before
    return statistics.median(times), requests / runs, connections / runs


def process_comparison(work: Path, tpm: Swtpm, runs: int) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.pki import SubjectSpec, build_csr

    options = EstOptions(auth="basic", keep_alive=True)
    with EstServer(work / "proc" / "est", options) as est:
        password = password_file(work / "proc")
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        agent = str(ROOT / ".venv" / "bin" / "devid-agent")
        configs = {}
        first: list[str] = []
        for store in ("software", "tpm"):
            path = work / "proc" / f"{store}.toml"
            path.write_text(
                config_text(
                    state_dir=work / "proc" / store,
                    est=est,
                    store=store,
                    tcti=tpm.tcti if store == "tpm" else "",
                    provider=provider_path() if store == "tpm" else None,
                    generations_kept=2,
                    username="device",
                    password_file=str(password),
                )
            )
            configs[store] = str(path)
            # the first enrollment (it fetches /cacerts, /csrattrs, learns Basic)
            est.records.clear()
            before = est.connections
            subprocess.run([agent, "--config", configs[store], "enroll"], env=env, check=True,
                           capture_output=True)  # fmt: skip
            first.append(f"{store}: {len(est.records)} requests on {est.connections - before}")
        key = ec.generate_private_key(ec.SECP256R1())
        csr = build_csr(key, SubjectSpec(common_name="curl-0001"))
        body = work / "proc" / "csr.b64"
        body.write_bytes(base64.encodebytes(csr.public_bytes(serialization.Encoding.DER)))
        curl = [
            "curl", "--silent", "--show-error", "--fail", "--cacert", str(est.ca_file),
            "--user", f"{options.username}:{options.password}",
            "-H", "Content-Type: application/pkcs10", "-H", "Content-Transfer-Encoding: base64",
            "--data-binary", f"@{body}", "-o", os.devnull,
            f"{est.url}/.well-known/est/simpleenroll",
        ]  # fmt: skip
        rows = [
            ("curl POST /simpleenroll", curl),
            ("devid-agent enroll --force (software)",
             [agent, "--config", configs["software"], "enroll", "--force"]),
            ("devid-agent enroll --force (TPM)",
             [agent, "--config", configs["tpm"], "enroll", "--force"]),
            ("devid-agent renew (software)", [agent, "--config", configs["software"], "renew"]),
            ("devid-agent renew (TPM)", [agent, "--config", configs["tpm"], "renew"]),
            ("(start-up floor) python -c pass", [sys.executable, "-c", "pass"]),
            ("(start-up floor) devid-agent --version", [agent, "--version"]),
        ]  # fmt: skip
        print(f"\nwhole processes, median of {runs} (ms), keep-alive server, Basic after 401")
        print(f"first enrollment (empty state): {'; '.join(first)} connection(s)")
        reference = None
        for label, command in rows:
            median, requests, connections = _process_runs(label, command, est, runs, env)
            reference = reference or median
            print(
                f"{label:<40} {median * 1e3:7.1f} ms  {median / reference:4.2f}x curl  "
                f"{requests:.1f} requests on {connections:.1f} connections"
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

            load_tpm2_provider(str(provider_path()), tcti=tpm.tcti)
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
            process_comparison(work, tpm, args.runs)
        finally:
            tpm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
