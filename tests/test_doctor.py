"""`devid-agent doctor` against a real swtpm and the real provider, and against broken setups."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, provider_path
from tests.support.procs import free_port
from tests.support.swtpm import Swtpm


def doctor(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "doctor", "--config", str(config), *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip


def write_config(tmp_path: Path, tcti: str, provider: Path, store: str = "tpm") -> Path:
    tmp_path.mkdir(exist_ok=True)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = tmp_path / "config.toml"
    path.write_text(
        f'[device]\nid = "gw-1"\n[paths]\nstate_dir = "{state}"\n'
        f'[keys]\nstore = "{store}"\n[tpm]\ntcti = "{tcti}"\nopenssl_provider = "{provider}"\n'
        "[control]\nenabled = false\n"
    )
    return path


def test_doctor_all_ok_with_tpm(swtpm: Swtpm, tmp_path: Path) -> None:
    config = write_config(tmp_path, swtpm.tcti, provider_path())
    result = doctor(config, "--json")
    assert result.returncode == 1, result.stdout + result.stderr  # est.url unset: enroll fails
    findings = {f["check"]: f for f in json.loads(result.stdout)}
    assert {name: f["status"] for name, f in findings.items()} == {
        "config": "ok",
        "state_dir": "ok",
        "identity_files": "ok",
        "est_config": "error",
        "est_credentials": "ok",
        "est_trust_anchor": "ok",
        "est_reachable": "ok",
        "clock": "ok",
        "identity": "warning",  # not enrolled
        "identity_key": "ok",
        "key_store": "ok",
        "tpm_owner_auth": "warning",  # a fresh swtpm has an empty owner auth
        "tls_provider": "ok",
        "bootloader_env": "ok",
        "firmware_anchors": "ok",
        "service": "ok",  # control.enabled = false
        "mqtt_broker": "ok",  # MQTT not configured
    }
    assert "manufacturer IBM" in findings["key_store"]["detail"]  # swtpm reports IBM's TPM
    assert findings["tls_provider"]["detail"].startswith("tpm2 OpenSSL provider 1.")
    assert "group tss" in findings["tpm_owner_auth"]["detail"]
    assert "tpm2_changeauth -c owner" in findings["tpm_owner_auth"]["detail"]


def test_doctor_is_content_once_the_owner_auth_is_set(swtpm: Swtpm, tmp_path: Path) -> None:
    from tpm2_pytss.constants import ESYS_TR
    from tpm2_pytss.types import TPM2B_AUTH

    from hal.tpm import open_esapi

    with open_esapi(swtpm.tcti) as ectx:
        ectx.hierarchy_change_auth(ESYS_TR.OWNER, TPM2B_AUTH(b"owner-secret"))
    result = doctor(write_config(tmp_path, swtpm.tcti, provider_path()), "--json")
    findings = {f["check"]: f for f in json.loads(result.stdout)}
    assert findings["tpm_owner_auth"] == {
        "check": "tpm_owner_auth",
        "status": "ok",
        "detail": "the TPM owner hierarchy has an auth value",
    }


def test_doctor_reports_unreachable_tpm(tmp_path: Path) -> None:
    tcti = f"swtpm:host=127.0.0.1,port={free_port()}"
    result = doctor(write_config(tmp_path, tcti, provider_path()))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ok       config:")
    [key_store] = [line for line in lines if " key_store: " in line]
    assert key_store.startswith(f"ERROR    key_store: cannot open the TPM at '{tcti}'")
    assert result.stderr == ""  # libtss2's own "ERROR:tcti:..." lines are silenced


def test_doctor_warns_about_software_keys(tmp_path: Path) -> None:
    result = doctor(write_config(tmp_path, "device:/dev/null", provider_path(), store="software"))
    assert result.returncode == 1  # est.url is not set
    assert (
        "warning  key_store: software keys: the private key is a file root can copy"
        in result.stdout
    )


def test_doctor_reports_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[device]\n")
    result = doctor(path)
    assert result.returncode == 1
    assert result.stdout == f"FATAL    config: {path}: device.id: missing required key (a string)\n"


BLOCK_TPM2_PYTSS = """
import sys


class NoLibtss2:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tpm2_pytss":
            raise ImportError("libtss2-esys.so.0: cannot open shared object file")


sys.meta_path.insert(0, NoLibtss2())
"""


def test_device_without_libtss2_runs_with_software_keys(tmp_path: Path) -> None:
    """tpm2-pytss is imported lazily: without it, software keys work and the TPM store says
    what to install."""
    import os

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCK_TPM2_PYTSS)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}

    def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", *args, "--config", str(config)],
            capture_output=True, text=True, cwd=ROOT, timeout=60, check=False, env=env,
        )  # fmt: skip

    software = write_config(tmp_path / "sw", "device:/dev/null", provider_path(), "software")
    assert "ERROR    key_store" not in run(software, "doctor").stdout
    assert run(software, "config", "check").stdout == "OK\n"
    status = run(software, "status")
    assert (status.returncode, status.stderr) == (81, "")  # not enrolled; no traceback
    assert "identity:  none" in status.stdout

    result = run(write_config(tmp_path / "tpm", "device:/dev/null", provider_path()), "doctor")
    assert result.returncode == 1
    assert (
        "ERROR    key_store: the TPM key store needs tpm2-pytss and libtss2, which cannot be "
        "imported (libtss2-esys.so.0: cannot open shared object file); install them, or set "
        'keys.store = "software"'
    ) in result.stdout.splitlines()


def test_doctor_fails_a_state_dir_owned_by_someone_else(tmp_path: Path) -> None:
    import os

    config = write_config(tmp_path, "device:/dev/null", provider_path(), store="software")
    state = tmp_path / "state"
    if os.geteuid() == 0:
        os.chown(state, 65534, 65534)
        owner = 65534
    else:  # unprivileged: point state_dir at a root-owned directory
        config.write_text(config.read_text().replace(str(state), "/"))
        state, owner = Path("/"), 0
    result = doctor(config)
    assert result.returncode == 1
    assert (
        f"ERROR    state_dir: {state} belongs to uid {owner}, not to this user (uid {os.geteuid()})"
    ) in result.stdout
