"""CSRs from config, signed in the TPM (and by software keys), verified by cryptography and by
`openssl req -verify`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from agent.config import parse_config
from agent.errors import ConfigError, KeyStoreError
from agent.pki import SubjectSpec, build_csr, public_key_der
from hal.interfaces import KeyAlgorithm
from hal.softkeys import SoftwareKeyStore
from hal.tpm import TpmKeyStore
from tests.support.swtpm import Swtpm

CONFIG = """
[device]
id = "gw-42"
[subject]
common_name = true
serial_number = true
organization = "Acme Gateways"
organizational_unit = "Field"
san_uris = ["urn:acme:device:{device_id}"]
san_dns = ["{device_id}.devices.example"]
"""


def openssl_verifies(csr: x509.CertificateSigningRequest, tmp_path: Path) -> bool:
    path = tmp_path / "req.pem"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    result = subprocess.run(
        ["openssl", "req", "-in", str(path), "-verify", "-noout"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return result.returncode == 0 and "verify OK" in (result.stdout + result.stderr)


def subject_from_config() -> SubjectSpec:
    config = parse_config(CONFIG)
    return SubjectSpec.from_config(config.device.id, config.subject)


def test_subject_and_san_from_config() -> None:
    spec = subject_from_config()
    name = spec.name()
    assert name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw-42"
    assert name.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "gw-42"
    assert name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Acme Gateways"
    assert name.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "Field"
    assert spec.san_uris == ("urn:acme:device:gw-42",)
    assert spec.san_dns == ("gw-42.devices.example",)


def test_subject_options_can_leave_out_cn() -> None:
    config = parse_config(
        '[device]\nid = "gw-1"\n[subject]\ncommon_name = false\nserial_number = true\n'
    )
    name = SubjectSpec.from_config(config.device.id, config.subject).name()
    assert name.get_attributes_for_oid(NameOID.COMMON_NAME) == []
    assert name.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "gw-1"


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm), ids=lambda a: a.value)
def test_tpm_signed_csr_verifies(swtpm: Swtpm, tmp_path: Path, algorithm: KeyAlgorithm) -> None:
    store = TpmKeyStore(tcti=swtpm.tcti)
    blob = store.generate(algorithm)
    with store.signer(blob) as key:
        csr = build_csr(key, subject_from_config(), challenge_password="tls-unique-value")
    assert csr.is_signature_valid
    assert public_key_der(csr.public_key()) == public_key_der(store.public_key(blob))
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:acme:device:gw-42"]
    assert san.get_values_for_type(x509.DNSName) == ["gw-42.devices.example"]
    password = csr.attributes.get_attribute_for_oid(x509.oid.AttributeOID.CHALLENGE_PASSWORD)
    assert password.value == b"tls-unique-value"
    expected_hash = hashes.SHA384 if algorithm is KeyAlgorithm.EC_P384 else hashes.SHA256
    assert isinstance(csr.signature_hash_algorithm, expected_hash)
    assert openssl_verifies(csr, tmp_path)


def test_software_key_csr_verifies(tmp_path: Path) -> None:
    store = SoftwareKeyStore()
    blob = store.generate(KeyAlgorithm.EC_P256)
    with store.signer(blob) as key:
        csr = build_csr(key, subject_from_config())
    assert csr.is_signature_valid
    assert openssl_verifies(csr, tmp_path)


def test_tampered_csr_fails_openssl(swtpm: Swtpm, tmp_path: Path) -> None:
    """The check is real: flip one byte of the signed body and openssl says no."""
    store = TpmKeyStore(tcti=swtpm.tcti)
    blob = store.generate(KeyAlgorithm.EC_P256)
    with store.signer(blob) as key:
        csr = build_csr(key, subject_from_config())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    index = der.index(b"gw-42")
    der[index] ^= 0x01
    tampered = x509.load_der_x509_csr(bytes(der))
    assert not tampered.is_signature_valid
    assert not openssl_verifies(tampered, tmp_path)


def test_signing_failure_is_a_keystore_error(swtpm: Swtpm) -> None:
    """A TPM that goes away mid-operation yields KeyStoreError, not a foreign exception."""
    store = TpmKeyStore(tcti=swtpm.tcti)
    blob = store.generate(KeyAlgorithm.EC_P256)
    with store.signer(blob) as key:
        swtpm.stop()
        with pytest.raises(KeyStoreError, match="could not sign the CSR"):
            build_csr(key, subject_from_config())


@pytest.mark.parametrize(
    "subject",
    [
        SubjectSpec(common_name="x" * 65),  # e.g. renewing a certificate whose CN is too long
        SubjectSpec(common_name="gw", san_dns=("b\u00fccher.example",)),
        SubjectSpec(common_name="gw", san_uris=("urn:\u00e9",)),
    ],
)
def test_subject_that_cannot_go_into_a_csr_is_a_config_error(subject: SubjectSpec) -> None:
    """cryptography raises ValueError for these; it used to escape build_csr as a traceback."""
    store = SoftwareKeyStore()
    with (
        store.signer(store.generate(KeyAlgorithm.EC_P256)) as key,
        pytest.raises(ConfigError, match="cannot put this subject into a CSR"),
    ):
        build_csr(key, subject)
