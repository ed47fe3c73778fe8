"""What judging the /cacerts answer costs a first enrollment (printed, never asserted).

A first enrollment in-process with software keys against our local EST server (fresh state
each run: /cacerts, /csrattrs, /simpleenroll, writing the generation), median of N, is the
reference row. Beside it, median of 200: the old filter (`validate_ca_certs`: valid now, nothing
else), `judge` over the same answer against the anchor (issuing CA + root), and a first
enrollment with a TLS anchor from another PKI (judge against the anchor fails, then judge per
root of the answer and the issued certificate validated under each): the answer alone, and
with two strangers before it (3 roots, the issuing one last). Goal: judging against the anchor
under 5% of the whole enrollment; the TLS-anchor-of-another-PKI rows (once per device, on its
first enrollment) under 15%.

Run: .venv/bin/python bench/bench_enroll_cacerts.py [--runs 20]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from cryptography.exceptions import InvalidSignature  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from agent import wiring  # noqa: E402
from agent.ca_refresh import judge  # noqa: E402
from agent.config import parse_config  # noqa: E402
from agent.errors import ChainValidationError  # noqa: E402
from agent.est.response import ca_roots, validate_ca_certs, validate_issued  # noqa: E402
from hal.softkeys import SoftwareKeyStore  # noqa: E402
from tests.support.ca import TestCA, utcnow  # noqa: E402
from tests.support.enroll_env import config_text  # noqa: E402
from tests.support.est_server import EstOptions, EstServer, Pki  # noqa: E402

SKEW = timedelta(seconds=300)


def median_ms(call: Callable[[], object], n: int = 200) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def first_enrollment_ms(runs: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        pki = Pki(issuing=TestCA(name="issuing CA", parent=TestCA(name="device root")))
        with EstServer(base / "est", EstOptions(), pki=pki) as est:
            times = []
            for i in range(runs):
                state = base / f"state-{i}"
                text = config_text(state_dir=state, est=est, store="software")
                config = parse_config(text, source=base / "config.toml")
                enroller = wiring.enroller(config, key_store=SoftwareKeyStore())
                t = time.perf_counter()
                enroller.enroll()
                times.append(time.perf_counter() - t)
                shutil.rmtree(state)
            return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the software key store warns on each key
    now = utcnow()
    root = TestCA(name="device root")
    issuing = TestCA(name="issuing CA", parent=root)
    answer = [issuing.cert, root.cert]
    tls_root = TestCA(name="TLS root")
    split = [TestCA(name="stranger 1").cert, TestCA(name="stranger 2").cert, *answer]
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = issuing.issue(key.public_key(), subject="gw-0001")

    def first_contact(split: list[x509.Certificate]) -> None:
        with contextlib.suppress(ChainValidationError):
            judge(split, anchors=[tls_root.cert], current=[], now=now, skew=SKEW)
        for candidate in ca_roots(split):
            kept = judge(split, anchors=[tls_root.cert, candidate], current=[], now=now, skew=SKEW)
            try:
                validate_issued([leaf], requested_key=key.public_key(),
                                ca_certs=kept.certificates, now=now, clock_skew=SKEW)  # fmt: skip
            except (ChainValidationError, InvalidSignature):
                continue
            return
        raise AssertionError("the issuing root must validate the leaf")

    whole = first_enrollment_ms(args.runs)
    rows = [
        ("old filter (validate_ca_certs)", median_ms(
            lambda: validate_ca_certs(answer, now=now, clock_skew=SKEW))),
        ("judge against the anchor", median_ms(
            lambda: judge(answer, anchors=[root.cert], current=[], now=now, skew=SKEW))),
        ("TLS anchor of another PKI", median_ms(lambda: first_contact(answer))),
        ("TLS anchor of another PKI, 2 strangers", median_ms(lambda: first_contact(split))),
    ]  # fmt: skip
    print(f"first enrollment, software key, in-process (median of {args.runs}): {whole:.2f} ms")
    for name, ms in rows:
        print(f"  {name:<42} {ms:7.3f} ms  {ms / whole:6.1%} of the enrollment")


if __name__ == "__main__":
    main()
