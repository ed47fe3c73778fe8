"""One encoding per bundle, and a signer threshold (issue 9, Deliver 1 and 2).

Every case the tamper corpus found accepted is here, validly signed where that matters, and
refused through the CLI with exit 65, one line, and the device's state byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.cli import EXIT_CONFIG, EXIT_TRUST
from agent.errors import FirmwareVerificationError
from agent.firmware import sigalg
from agent.firmware.bundle import SignatureBlock, encode_header, read_header
from agent.firmware.manifest import MAX_DEPTH, parse_manifest
from agent.firmware.sign import Signer
from tests.support.ca import key_pem, pem
from tests.support.firmware import COMPATIBLE, Rig, Vendor, cli, image, make_bundle, manifest_for

PAYLOAD = image(8 * 1024, seed=9)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path / "dev", bootloader="uboot")


def der_certs(signer: Signer) -> tuple[bytes, ...]:
    return tuple(c.public_bytes(serialization.Encoding.DER) for c in signer.certs)


def block(signer: Signer, manifest: bytes) -> SignatureBlock:
    certs = der_certs(signer)
    return SignatureBlock(certs=certs, signature=sigalg.sign(signer.key, manifest, certs))


def signed_raw(manifest: bytes, signers: list[Signer], payload: bytes = PAYLOAD) -> bytes:
    """A bundle over arbitrary manifest bytes, validly signed by `signers`."""
    return encode_header(manifest, [block(s, manifest) for s in signers]) + payload


def manifest_table(payload: bytes = PAYLOAD) -> dict[str, object]:
    table: dict[str, object] = json.loads(manifest_for(payload).to_bytes())
    return table


def canonical(table: object) -> bytes:
    return json.dumps(table, sort_keys=True, separators=(",", ":")).encode()


def refused(rig: Rig, bundle: bytes, message: str) -> None:
    path = rig.write_bundle(bundle, "candidate.fw")
    before = rig.snapshot()
    for command in ("verify", "install"):
        code, out, err = cli(rig.config, command, str(path))
        lines = err.strip().splitlines()
        assert code == EXIT_TRUST, (command, err)
        assert len(lines) == 1 and message in lines[0], err
        assert out == ""
    assert rig.snapshot() == before


# -- manifest types and forms -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("format", True, "format True is not supported"),
        ("format", 1.0, "format 1.0 is not supported"),
        ("security_version", True, "security_version must be an integer"),
        ("security_version", 1.0, "security_version must be an integer"),
        ("created", "2026-1-5T7:0:0Z", "created must be a UTC time exactly like"),
        ("created", "2026-01-05T07:00:00+00:00", "created must be a UTC time exactly like"),
        ("created", "2026-01-05 07:00:00Z", "created must be a UTC time exactly like"),
        ("created", "2026-02-30T07:00:00Z", "created must be a UTC time like"),
    ],
)
def test_validly_signed_variant_manifests_are_refused(
    rig: Rig, key: str, value: object, message: str
) -> None:
    table = manifest_table()
    table[key] = value
    refused(rig, signed_raw(canonical(table), [rig.vendor.signer]), message)


@pytest.mark.parametrize(
    ("key", "value"), [("size", True), ("size", float(len(PAYLOAD))), ("hash_algorithm", 1)]
)
def test_payload_fields_have_exact_types(rig: Rig, key: str, value: object) -> None:
    table = manifest_table()
    payload = table["payload"]
    assert isinstance(payload, dict)
    payload[key] = value
    refused(rig, signed_raw(canonical(table), [rig.vendor.signer]), "manifest: payload")


def test_float_spelling_of_an_integer_is_refused_by_re_encoding() -> None:
    # 1e0 and 1.0 parse to the same float; neither is the one encoding of the integer 1.
    data = manifest_for(PAYLOAD).to_bytes().replace(b'"format":1', b'"format":1e0')
    with pytest.raises(FirmwareVerificationError, match="manifest:"):
        parse_manifest(data, max_payload_bytes=1 << 30)


@pytest.mark.parametrize("depth", [3, 100, 3000, 16000])
def test_deep_unsigned_manifest_is_refused_before_parsing(rig: Rig, depth: int) -> None:
    # Found by the corpus: 3000 nested arrays made `firmware verify` exit 1 with RecursionError.
    manifest = b"[" * depth + b"]" * depth
    if len(manifest) > 16 * 1024:
        manifest = b"[" * (8 * 1024)
    bundle = encode_header(manifest, [SignatureBlock(certs=(b"x",), signature=b"y")])
    message = f"nested deeper than {MAX_DEPTH} levels"
    refused(rig, bundle + PAYLOAD, message)


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    table = manifest_table()
    table["version"] = '[[[[{{{{\\"]]]'
    manifest = parse_manifest(canonical(table), max_payload_bytes=1 << 30)
    assert manifest.version == '[[[[{{{{\\"]]]'


def test_manifest_size_is_bounded_before_parsing() -> None:
    with pytest.raises(FirmwareVerificationError, match="more than 16384"):
        parse_manifest(b" " * (16 * 1024 + 1), max_payload_bytes=1 << 30)


def test_canonical_manifest_still_verifies(rig: Rig) -> None:
    path = rig.write_bundle(make_bundle(PAYLOAD, [rig.vendor.signer]))
    code, _out, err = cli(rig.config, "verify", str(path))
    assert code == 0, err


# -- duplicate blocks -------------------------------------------------------------------------


def test_same_signature_block_twice_is_refused(rig: Rig) -> None:
    manifest = manifest_for(PAYLOAD).to_bytes()
    one = block(rig.vendor.signer, manifest)
    refused(rig, encode_header(manifest, [one, one]) + PAYLOAD, "signature 1 repeats signature 0")


def test_same_signer_certificate_twice_is_refused(rig: Rig) -> None:
    # ECDSA signatures are randomized: two signatures by one signer differ, and still add nothing.
    manifest = manifest_for(PAYLOAD).to_bytes()
    blocks = [block(rig.vendor.signer, manifest), block(rig.vendor.signer, manifest)]
    assert blocks[0].signature != blocks[1].signature
    refused(rig, encode_header(manifest, blocks) + PAYLOAD, "same signer certificate")


def test_same_key_under_two_certificates_counts_once(rig: Rig) -> None:
    vendor = rig.vendor
    twin_cert = vendor.inter.issue(
        vendor.signer.key.public_key(),  # type: ignore[union-attr]
        subject="firmware signer twin",
        eku=[ExtendedKeyUsageOID.CODE_SIGNING],
    )
    twin = Signer(key=vendor.signer.key, certs=(twin_cert, vendor.inter.cert))
    refused(rig, make_bundle(PAYLOAD, [vendor.signer, twin]), "same key as signature 0")


def test_same_certificate_twice_in_a_block_is_refused(rig: Rig) -> None:
    manifest = manifest_for(PAYLOAD).to_bytes()
    signer = rig.vendor.signer
    certs = (*der_certs(signer), der_certs(signer)[1])
    one = SignatureBlock(certs=certs, signature=sigalg.sign(signer.key, manifest, certs))
    refused(rig, encode_header(manifest, [one]) + PAYLOAD, "same certificate twice")


def test_header_is_re_encoded(rig: Rig) -> None:
    data = make_bundle(PAYLOAD, [rig.vendor.signer, rig.vendor.make_signer("ec-p384")])
    header = read_header(io.BytesIO(data))
    assert (
        encode_header(header.manifest.to_bytes(), list(header.signatures))
        == data[: header.payload_offset]
    )


# -- the signer threshold ---------------------------------------------------------------------


def threshold_rig(rig: Rig, required: int) -> tuple[Signer, Signer]:
    second = rig.vendor.make_signer("ed25519")
    text = rig.config.read_text().replace(
        "[firmware]\n", f"[firmware]\nrequired_signers = {required}\n"
    )
    rig.config.write_text(text)
    return rig.vendor.signer, second


def test_two_signers_required_one_removed_is_refused(rig: Rig) -> None:
    # Found by the corpus: with one of two signatures removed, the bundle was accepted.
    first, second = threshold_rig(rig, 2)
    both = make_bundle(PAYLOAD, [first, second])
    path = rig.write_bundle(both, "both.fw")
    assert cli(rig.config, "verify", str(path))[0] == 0
    refused(rig, make_bundle(PAYLOAD, [first]), "signed by 1 distinct signer key(s)")
    refused(rig, make_bundle(PAYLOAD, [second]), "firmware.required_signers is 2")


def test_threshold_counts_only_signers_that_chain(rig: Rig) -> None:
    first, _ = threshold_rig(rig, 2)
    stranger = Vendor().signer  # a valid signature by a key that chains to no anchor here
    refused(rig, make_bundle(PAYLOAD, [first, stranger]), "signature 1")


def test_more_signers_than_required_are_fine(rig: Rig) -> None:
    first, second = threshold_rig(rig, 1)
    path = rig.write_bundle(make_bundle(PAYLOAD, [first, second]))
    code, _, err = cli(rig.config, "install", str(path))
    assert code == 0, err


def test_sign_with_two_signers_meets_the_threshold(rig: Rig) -> None:
    _first, second = threshold_rig(rig, 2)
    files = rig.files
    key2, cert2 = rig.root / "second.key", rig.root / "second.pem"
    key2.write_bytes(key_pem(second.key))  # type: ignore[arg-type]
    cert2.write_bytes(pem(second.certs[0]))
    img = rig.root / "image.bin"
    img.write_bytes(PAYLOAD)
    out = rig.root / "two.fw"
    code, _, err = cli(
        rig.config, "sign", "--key", str(files["key"]), "--cert", str(files["cert"]),
        "--key", str(key2), "--cert", str(cert2), "--chain", str(files["chain"]),
        "--compatible", COMPATIBLE, "--version", "2.0", "--security-version", "1",
        str(img), "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert len(read_header(io.BytesIO(out.read_bytes())).signatures) == 2
    code, _, err = cli(rig.config, "install", str(out))
    assert code == 0, err


def test_sign_refuses_unpaired_keys(rig: Rig) -> None:
    files = rig.files
    code, _, err = cli(
        rig.config, "sign", "--key", str(files["key"]), "--key", str(files["key"]),
        "--cert", str(files["cert"]), "--compatible", COMPATIBLE, "--version", "2.0",
        "--security-version", "1", str(files["cert"]), "-o", str(rig.root / "x.fw"),
    )  # fmt: skip
    assert code == EXIT_CONFIG and "one --cert per --key" in err


@pytest.mark.parametrize("value", ["0", "5", "true", "1.0"])
def test_required_signers_is_checked(rig: Rig, value: str) -> None:
    text = rig.config.read_text().replace(
        "[firmware]\n", f"[firmware]\nrequired_signers = {value}\n"
    )
    rig.config.write_text(text)
    code, _, err = cli(rig.config, "status")
    assert code == EXIT_CONFIG
    assert "firmware.required_signers" in err and len(err.strip().splitlines()) == 1


def test_digest_helper_is_sha256() -> None:  # keeps PAYLOAD honest for the cases above
    assert manifest_for(PAYLOAD).digest == hashlib.sha256(PAYLOAD).digest()
    assert manifest_for(PAYLOAD).compatible == COMPATIBLE
