"""`status` and `firmware` commands import only what they use: building the parser imports no
command's machinery, and neither `status` nor `firmware status` pulls in EST enrollment (whose
ASN.1 modules alone cost ~70 ms). Only the named command's module is imported (its register()
builds its subparser); `--version` imports none and reads no config; the cold paths import no
stdlib module they do not use (shutil, secrets, difflib, json: 1-3 ms each), and `firmware
status` none of the install, verify or audit machinery. Figures: bench/bench_startup.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.support.firmware import Rig

PROBE = """
import sys
from agent.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:  # --version
    code = e.code
sys.stdout.flush()
modules = sorted(sys.modules)
import json
print("\\n" + json.dumps({"code": code, "modules": modules}))
"""

ENROLL_MACHINERY = ("agent.enroll", "agent.est.client", "agent.est.transport",
                    "agent.est.csrattrs", "agent.est.csr", "agent.tls", "pyasn1",
                    "pyasn1_modules", "tpm2_pytss", "http.client", "ssl")  # fmt: skip


def loaded(*argv: str) -> tuple[int, set[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report["code"], set(report["modules"])


COMMAND_MODULES = {f"agent.cli.{name}_cmd" for name in
                   ("audit", "config", "doctor", "enroll", "run", "status", "firmware", "metrics")}  # fmt: skip
#: stdlib modules the cold paths do without (argparse's help width needs no shutil, temp names
#: no secrets, a config error's "did you mean" loads difflib, JSON is read or written on demand)
UNUSED_STDLIB = {"shutil", "secrets", "difflib", "hmac", "base64"}
FIRMWARE_MACHINERY = {"agent.firmware.device", "agent.firmware.bundle", "agent.firmware.verify",
                      "agent.firmware.manifest", "agent.audit", "agent.audit_log",
                      "agent.audit_firmware", "hashlib"}  # fmt: skip


def _heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if any(m == h or m.startswith(h + ".") for h in ENROLL_MACHINERY)}


def _commands(modules: set[str]) -> set[str]:
    return COMMAND_MODULES & modules


def test_version_imports_no_command_and_no_config() -> None:
    code, modules = loaded("--version")
    assert code == 0
    assert _commands(modules) == set()
    assert not {"agent.config", "tomllib", "agent.wiring"} & modules


def test_building_the_parser_imports_no_command_machinery(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[device]\nid = "gw-1"\n')
    code, modules = loaded("--config", str(config), "config", "check")
    assert code == 0
    assert _heavy(modules) == set()
    assert not {"agent.status", "agent.identity", "cryptography.x509"} & modules
    assert _commands(modules) == {"agent.cli.config_cmd"}
    assert UNUSED_STDLIB & modules == set()


@pytest.mark.parametrize("enrolled", [False, True])
def test_status_imports_no_enrollment(tmp_path: Path, enrolled: bool) -> None:
    state = tmp_path / "state"
    config = tmp_path / "c.toml"
    config.write_text(f'[device]\nid = "gw-1"\n[paths]\nstate_dir = "{state}"\n'
                      '[keys]\nstore = "software"\n[control]\nenabled = false\n')  # fmt: skip
    if enrolled:
        from agent import wiring
        from agent.config import load_config
        from hal.interfaces import KeyAlgorithm
        from hal.softkeys import SoftwareKeyStore
        from tests.support.ca import TestCA

        keys = SoftwareKeyStore()
        blob = keys.generate(KeyAlgorithm.EC_P256)
        ca = TestCA()
        wiring.identity_store(load_config(config)).install(
            key_blob=blob,
            key_file_name=keys.key_file_name,
            certificate=ca.issue(keys.public_key(blob), subject="gw-1"),
            chain=[],
            ca_certs=[ca.cert],
        )
    code, modules = loaded("--config", str(config), "status")
    assert code == (0 if enrolled else 81)
    assert _heavy(modules) == set()
    # before the first enrollment there is no certificate to parse
    assert ("cryptography.x509" in modules) is enrolled
    assert _commands(modules) == {"agent.cli.status_cmd", "agent.cli.config_cmd"}
    assert {"shutil", "secrets", "difflib"} & modules == set()
    if not enrolled:  # no pending request, no scheduler record to read: no JSON, no renewal
        assert {"json", "agent.renewal", "agent.renewal_state", *UNUSED_STDLIB} & modules == set()


def test_firmware_status_imports_no_enrollment(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "fw", bootloader="file", counter="file")
    code, modules = loaded("--config", str(rig.config), "firmware", "status")
    assert code == 0
    assert _heavy(modules) == set()
    assert _commands(modules) == {"agent.cli.firmware_cmd", "agent.cli.config_cmd"}
    assert (FIRMWARE_MACHINERY | UNUSED_STDLIB) & modules == set()


def test_help_still_lists_every_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0
    for command in ("audit", "config", "doctor", "enroll", "renew", "run", "status", "firmware",
                    "metrics"):  # fmt: skip
        assert f"\n    {command} " in proc.stdout, command
    # a command's own help, and a typo, still work with only that module (or all) registered
    sub = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--help"], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert sub.returncode == 0 and "--json" in sub.stdout
    typo = subprocess.run([sys.executable, "-m", "agent.cli", "stauts"], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert typo.returncode == 2 and "invalid choice: 'stauts'" in typo.stderr


def test_the_light_firmware_status_says_what_the_device_says(tmp_path: Path) -> None:
    """As root, `firmware status` reads without building the device; in every state it must say
    exactly what `FirmwareDevice.status()` says: fresh, installed (pending), committed."""
    from agent import wiring
    from agent.config import load_config
    from tests.support.firmware import cli, image, make_bundle

    rig = Rig(tmp_path / "fw", bootloader="uboot", counter="file")
    config = load_config(rig.config)

    def same() -> None:
        assert wiring.firmware_status(config) == wiring.firmware_device(config).status()

    same()
    bundle = rig.write_bundle(make_bundle(image(8192, 2), [rig.vendor.signer], security_version=2))
    assert cli(rig.config, "install", str(bundle))[0] == 0
    same()
    assert rig.reboot() == "B"
    same()
    assert cli(rig.config, "commit")[0] == 0
    same()


FAST_PROBE = """
import json, sys
from agent.control.client import fast_main
code = fast_main(sys.argv[1:])
sys.stdout.flush()
print("\\n" + json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""

#: what the status client against a running service must never import
NOT_ON_THE_FAST_PATH = ("cryptography", "tpm2_pytss", "requests", "pyasn1", "pyasn1_modules",
                        "ssl", "argparse", "logging")  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the service as another uid")
def test_status_from_a_running_service_uses_the_standard_library_only() -> None:
    from tests.support.control import ServiceUnderTest, world

    with world() as base:
        service = ServiceUnderTest(base)
        try:
            service.start()
            service.wait_serving()
            service.wait_enrolled()
            for argv in (["--config", str(service.config), "status"],
                         ["status", "--json", "--config", str(service.config)]):  # fmt: skip
                proc = subprocess.run([sys.executable, "-c", FAST_PROBE, *argv], cwd=ROOT,
                                      capture_output=True, text=True, timeout=60)  # fmt: skip
                report = json.loads(proc.stdout.strip().splitlines()[-1])
                assert report["code"] == 0, proc.stdout + proc.stderr
                assert "service:" in proc.stdout or '"service"' in proc.stdout
                modules = set(report["modules"])
                heavy = {m for m in modules if m.split(".")[0] in NOT_ON_THE_FAST_PATH}
                assert heavy == set(), heavy
                ours = {m for m in modules if m.split(".")[0] in ("agent", "hal")}
                assert ours == {"agent", "agent.control", "agent.control.client"}
            # no service: the same entry point hands over to the full CLI (which reads the disk)
            service.stop()
            code, modules = _fast("--config", str(service.config), "status")
            assert code != 0 and "agent.cli.status_cmd" in modules
            assert _heavy(modules) == set()
        finally:
            service.close()


def _fast(*argv: str) -> tuple[int, set[str]]:
    proc = subprocess.run([sys.executable, "-c", FAST_PROBE, *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report["code"], set(report["modules"])
