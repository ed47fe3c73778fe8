"""`status` calls an identity healthy only when its key loads in the TPM and signs for its
certificate (real swtpm, real CLI)."""

from __future__ import annotations

import json

from hal.interfaces import KeyAlgorithm
from hal.tpm import TpmKeyStore
from tests.support.device import Device


def status(device: Device) -> tuple[int, dict[str, object]]:
    run = device.run("status", "--json")
    return run.code, json.loads(run.out)


def test_a_key_that_loads_and_signs_is_healthy(device: Device) -> None:
    assert device.run("enroll").code == 0
    code, report = status(device)
    assert code == 0
    assert report["identity"]["key_usable"] is True  # type: ignore[index]


def test_a_key_that_is_not_the_certificates_is_unhealthy(device: Device) -> None:
    assert device.run("enroll").code == 0
    key = device.state_dir / "identity" / "current" / "key.tss2.pem"
    key.write_bytes(TpmKeyStore(tcti=device.tpm.tcti).generate(KeyAlgorithm.EC_P256))
    code, report = status(device)
    assert code == 86  # identity unusable
    assert report["identity"]["state"] == "valid"  # type: ignore[index]
    assert report["identity"]["key_usable"] is False  # type: ignore[index]
    assert report["errors"] == [
        f"the identity's key is unusable: {key.resolve()} does not sign for "
        f"{key.resolve().parent / 'cert.pem'}: it is not the certificate's key"
    ]


def test_a_key_the_tpm_cannot_load_is_unhealthy(device: Device) -> None:
    assert device.run("enroll").code == 0
    key = device.state_dir / "identity" / "current" / "key.tss2.pem"
    key.write_bytes(b"")
    code, report = status(device)
    assert code == 86 and report["identity"]["key_usable"] is False  # type: ignore[index]
    assert "the identity's key is unusable" in str(report["errors"])
