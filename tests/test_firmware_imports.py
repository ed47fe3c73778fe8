"""Firmware commands import only what they use (issue 9, Deliver 7): one process per command,
run once per boot or per hook, so EST's ASN.1 modules (pyasn1_modules.rfc7030 alone is ~70 ms)
and, for status/commit/rollback, cryptography's X.509 code stay out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.firmware import Rig, image, make_bundle

ROOT = Path(__file__).resolve().parent.parent
NEVER = ("pyasn1", "pyasn1_modules", "agent.est", "agent.enroll", "agent.identity", "requests",
         "urllib3", "agent.firmware.fetch")  # fmt: skip
NO_X509 = ("cryptography.x509", "agent.firmware.chain", "agent.firmware.pem")

PROBE = """
import json, sys
from agent.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def modules_after(*args: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT, check=False
    )
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report["code"] == 0, done.stderr
    return set(report["modules"])


def loaded(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Rig:
    return Rig(tmp_path_factory.mktemp("imports") / "dev", bootloader="file")


@pytest.mark.parametrize("command", ["status", "commit"])
def test_status_and_commit_load_no_x509_and_no_est(rig: Rig, command: str) -> None:
    modules = modules_after("--config", str(rig.config), "firmware", command)
    assert loaded(modules, NEVER + NO_X509) == []


def test_verify_loads_no_est(rig: Rig) -> None:
    bundle = rig.write_bundle(make_bundle(image(4096), [rig.vendor.signer]))
    modules = modules_after("--config", str(rig.config), "firmware", "verify", str(bundle))
    assert loaded(modules, NEVER) == []
    assert "cryptography.x509" in modules  # what it needs, it has


def test_verify_from_https_loads_requests_but_no_est(rig: Rig, tmp_path: Path) -> None:
    from tests.support.ca import TestCA
    from tests.support.fw_http_server import FwServer, Route

    ca = TestCA(name="imports download CA")
    config = tmp_path / "config.toml"
    config.write_text(
        rig.config.read_text() + f'download_ca = "{ca.write_cert(tmp_path / "ca.pem")}"\n'
    )
    with FwServer(ca.server_identity(tmp_path)) as server:
        server.routes["/b.fw"] = Route(body=make_bundle(image(4096), [rig.vendor.signer]))
        modules = modules_after("--config", str(config), "firmware", "verify", server.url("/b.fw"))
    assert loaded(modules, NEVER[:5]) == []
    assert "requests" in modules and "agent.firmware.fetch" in modules
