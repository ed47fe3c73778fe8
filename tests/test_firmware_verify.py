"""Signer chains, signature schemes, compatibility and anti-rollback: pure, at an explicit now."""

from __future__ import annotations

import datetime as dt
import io

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.errors import ChainValidationError, FirmwareVerificationError, RollbackError
from agent.firmware.bundle import read_header
from agent.firmware.chain import NamedCrl, TrustPolicy
from agent.firmware.sign import Signer
from agent.firmware.verify import DeviceFacts, stream_payload, verify_header
from tests.support.ca import TestCA
from tests.support.firmware import (
    COMPATIBLE,
    Vendor,
    image,
    intermediate,
    make_bundle,
    manifest_for,
)

NOW = dt.datetime.now(dt.timezone.utc)
PAYLOAD = image(4096)


@pytest.fixture(scope="module")
def vendor() -> Vendor:
    return Vendor()


def check(
    data: bytes,
    vendor: Vendor,
    *,
    committed: int = 0,
    compatible: str = COMPATIBLE,
    crls: tuple[NamedCrl, ...] = (),
    now: dt.datetime = NOW,
) -> None:
    stream = io.BytesIO(data)
    header = read_header(stream)
    manifest = verify_header(
        header,
        policy=TrustPolicy(anchors=(vendor.root.cert,), crls=crls),
        device=DeviceFacts(compatible=compatible, committed_security_version=committed),
        now=now,
    )
    stream_payload(stream, manifest)


@pytest.mark.parametrize("kind", ["ec-p256", "ec-p384", "ed25519", "rsa-2048"])
def test_signature_schemes(vendor: Vendor, kind: str) -> None:
    check(make_bundle(PAYLOAD, [vendor.make_signer(kind)]), vendor)


def test_rsa_below_2048_is_refused(vendor: Vendor) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - on purpose
    cert = vendor.inter.issue(
        key.public_key(), subject="weak", eku=[ExtendedKeyUsageOID.CODE_SIGNING]
    )
    good = make_bundle(PAYLOAD, [vendor.signer])
    header = read_header(io.BytesIO(good))
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    from agent.firmware.bundle import SignatureBlock, encode_header
    from agent.firmware.sigalg import signed_bytes

    der = [c.public_bytes(serialization.Encoding.DER) for c in (cert, vendor.inter.cert)]
    sig = key.sign(
        signed_bytes(header.manifest_bytes, der),
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        hashes.SHA256(),
    )
    data = encode_header(header.manifest_bytes, [SignatureBlock(tuple(der), sig)]) + PAYLOAD
    with pytest.raises(FirmwareVerificationError, match="signer key type is not allowed"):
        check(data, vendor)


def test_unknown_signer(vendor: Vendor) -> None:
    other = Vendor()
    with pytest.raises(ChainValidationError, match="does not chain to a firmware trust anchor"):
        check(make_bundle(PAYLOAD, [other.signer]), vendor)


def test_self_signed_signer(vendor: Vendor) -> None:
    rogue = TestCA(name="firmware signer ec-p256")
    signer = Signer(key=rogue.key, certs=(rogue.cert,))
    with pytest.raises(ChainValidationError):
        check(make_bundle(PAYLOAD, [signer]), vendor)


def test_missing_intermediate(vendor: Vendor) -> None:
    signer = Signer(key=vendor.signer.key, certs=vendor.signer.certs[:1])
    with pytest.raises(ChainValidationError, match="does not chain"):
        check(make_bundle(PAYLOAD, [signer]), vendor)


def test_signer_issued_by_root_directly(vendor: Vendor) -> None:
    check(make_bundle(PAYLOAD, [vendor.make_signer(issuer=vendor.root)]), vendor)


@pytest.mark.parametrize(
    "eku", [[ExtendedKeyUsageOID.CLIENT_AUTH], [ExtendedKeyUsageOID.SERVER_AUTH], []]
)
def test_wrong_eku(vendor: Vendor, eku: list[x509.ObjectIdentifier]) -> None:
    signer = vendor.make_signer(eku=eku)
    with pytest.raises(ChainValidationError, match="lacks the codeSigning extended key usage"):
        check(make_bundle(PAYLOAD, [signer]), vendor)


def test_expired_signer(vendor: Vendor) -> None:
    signer = vendor.make_signer(
        not_before=NOW - dt.timedelta(days=60), not_after=NOW - dt.timedelta(days=1)
    )
    with pytest.raises(ChainValidationError, match="expired at"):
        check(make_bundle(PAYLOAD, [signer]), vendor)


def test_not_yet_valid_signer(vendor: Vendor) -> None:
    signer = vendor.make_signer(not_before=NOW + dt.timedelta(days=1))
    with pytest.raises(ChainValidationError, match="is not valid before"):
        check(make_bundle(PAYLOAD, [signer]), vendor)


def test_time_comes_from_the_caller(vendor: Vendor) -> None:
    data = make_bundle(PAYLOAD, [vendor.signer])
    check(data, vendor)
    with pytest.raises(ChainValidationError, match="expired at"):
        check(data, vendor, now=NOW + dt.timedelta(days=4000))


def _crl(
    ca: TestCA, serials: list[int], *, next_update: dt.datetime | None = None
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(NOW - dt.timedelta(hours=1))
        .next_update(next_update or NOW + dt.timedelta(days=7))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(NOW - dt.timedelta(minutes=5))
            .build()
        )
    return builder.sign(ca.key, hashes.SHA256())


def test_revoked_signer(vendor: Vendor) -> None:
    signer = vendor.make_signer()
    data = make_bundle(PAYLOAD, [signer])
    crl = NamedCrl("inter.crl", _crl(vendor.inter, [signer.certs[0].serial_number]))
    with pytest.raises(ChainValidationError, match=r"is revoked \(CRL inter.crl\)"):
        check(data, vendor, crls=(crl,))
    check(data, vendor, crls=(NamedCrl("inter.crl", _crl(vendor.inter, [12345])),))


def test_revoked_intermediate(vendor: Vendor) -> None:
    data = make_bundle(PAYLOAD, [vendor.signer])
    crl = NamedCrl("root.crl", _crl(vendor.root, [vendor.inter.cert.serial_number]))
    with pytest.raises(ChainValidationError, match=r"firmware intermediate.*is revoked"):
        check(data, vendor, crls=(crl,))


def test_crl_with_a_forged_signature_is_refused(vendor: Vendor) -> None:
    impostor = TestCA(name="firmware intermediate")  # same name, different key
    crl = NamedCrl("forged.crl", _crl(impostor, []))
    with pytest.raises(ChainValidationError, match=r"forged\.crl does not verify"):
        check(make_bundle(PAYLOAD, [vendor.signer]), vendor, crls=(crl,))


def test_stale_crl_is_refused(vendor: Vendor) -> None:
    crl = NamedCrl("old.crl", _crl(vendor.inter, [], next_update=NOW - dt.timedelta(minutes=1)))
    with pytest.raises(ChainValidationError, match=r"old\.crl is stale"):
        check(make_bundle(PAYLOAD, [vendor.signer]), vendor, crls=(crl,))


def test_compatible_mismatch(vendor: Vendor) -> None:
    data = make_bundle(PAYLOAD, [vendor.signer], compatible="other-board")
    with pytest.raises(FirmwareVerificationError, match="bundle is for 'other-board'"):
        check(data, vendor)


def test_downgrade_below_committed(vendor: Vendor) -> None:
    data = make_bundle(PAYLOAD, [vendor.signer], security_version=4)
    check(data, vendor, committed=4)
    with pytest.raises(RollbackError, match="security_version 4 is below the committed"):
        check(data, vendor, committed=5)


def test_all_signatures_must_verify(vendor: Vendor) -> None:
    second = vendor.make_signer("ed25519")
    check(make_bundle(PAYLOAD, [vendor.signer, second]), vendor)
    with pytest.raises(ChainValidationError):
        check(make_bundle(PAYLOAD, [vendor.signer, Vendor().signer]), vendor)


def test_signature_over_another_manifest(vendor: Vendor) -> None:
    a = make_bundle(PAYLOAD, [vendor.signer], version="1.0")
    b = make_bundle(PAYLOAD, [vendor.signer], version="2.0")
    ha, hb = read_header(io.BytesIO(a)), read_header(io.BytesIO(b))
    from agent.firmware.bundle import encode_header

    swapped = encode_header(ha.manifest_bytes, list(hb.signatures)) + PAYLOAD
    with pytest.raises(FirmwareVerificationError, match="does not verify over the manifest"):
        check(swapped, vendor)


def test_signer_with_any_eku_only_is_refused(vendor: Vendor) -> None:
    # Deliberate: anyExtendedKeyUsage does not make a certificate a firmware signer.
    signer = vendor.make_signer(eku=[ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE])
    with pytest.raises(ChainValidationError, match="lacks the codeSigning extended key usage"):
        check(make_bundle(PAYLOAD, [signer]), vendor)
    both = [ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]
    check(make_bundle(PAYLOAD, [vendor.make_signer(eku=both)]), vendor)


@pytest.mark.parametrize(
    "ca_eku",
    [[ExtendedKeyUsageOID.CODE_SIGNING], [ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE], None],
)
def test_intermediate_constrained_to_code_signing_may_issue(
    vendor: Vendor, ca_eku: list[x509.ObjectIdentifier] | None
) -> None:
    # Found in review: the client verifier's CA policy demanded clientAuth in a CA's EKU, so
    # a code-signing-only intermediate (the usual shape of a code-signing PKI) was refused.
    inter = intermediate(vendor.root, "code signing CA", eku=ca_eku)
    signer = vendor.make_signer(issuer=inter)
    check(make_bundle(PAYLOAD, [signer]), vendor)


@pytest.mark.parametrize(
    "ca_eku", [[ExtendedKeyUsageOID.CLIENT_AUTH], [ExtendedKeyUsageOID.SERVER_AUTH]]
)
def test_intermediate_constrained_to_tls_may_not_issue(
    vendor: Vendor, ca_eku: list[x509.ObjectIdentifier]
) -> None:
    # Found in review: a CA constrained to clientAuth (a device-identity CA under the same
    # root, say) could issue firmware signers.
    inter = intermediate(vendor.root, "device identity CA", eku=ca_eku)
    signer = vendor.make_signer(issuer=inter)
    with pytest.raises(ChainValidationError, match="does not chain to a firmware trust anchor"):
        check(make_bundle(PAYLOAD, [signer]), vendor)


def _wrong_scheme(key: object, data: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):  # P-384 with SHA-256
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    assert isinstance(key, rsa.RSAPrivateKey)
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def _wrong_salt(key: object, data: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    assert isinstance(key, rsa.RSAPrivateKey)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
    return key.sign(data, pss, hashes.SHA256())


@pytest.mark.parametrize(
    ("kind", "forge"),
    [("ec-p384", _wrong_scheme), ("rsa-2048", _wrong_scheme), ("rsa-2048", _wrong_salt)],
)
def test_the_key_type_fixes_the_scheme(vendor: Vendor, kind: str, forge: object) -> None:
    """A valid signature by the right key in another scheme (P-384 with SHA-256, RSA
    PKCS#1 v1.5, PSS with another salt length) is refused: nothing in the bundle picks it."""
    from cryptography.hazmat.primitives import serialization

    from agent.firmware import sigalg
    from agent.firmware.bundle import SignatureBlock, encode_header

    signer = vendor.make_signer(kind)
    manifest = manifest_for(PAYLOAD).to_bytes()
    certs = tuple(c.public_bytes(serialization.Encoding.DER) for c in signer.certs)
    signature = forge(signer.key, sigalg.signed_bytes(manifest, certs))  # type: ignore[operator]
    data = encode_header(manifest, [SignatureBlock(certs=certs, signature=signature)]) + PAYLOAD
    with pytest.raises(FirmwareVerificationError, match="does not verify over the manifest"):
        check(data, vendor)


def test_crl_not_yet_valid_is_refused(vendor: Vendor) -> None:
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(vendor.inter.cert.subject)
        .last_update(NOW + dt.timedelta(hours=1))
        .next_update(NOW + dt.timedelta(days=7))
        .sign(vendor.inter.key, hashes.SHA256())
    )
    with pytest.raises(ChainValidationError, match=r"future\.crl is not valid before"):
        check(make_bundle(PAYLOAD, [vendor.signer]), vendor, crls=(NamedCrl("future.crl", crl),))


def test_a_ca_certificate_cannot_sign(vendor: Vendor) -> None:
    """Found in review: the end-entity policy permitted anything, so a CA certificate with the
    codeSigning EKU (its key also signs certificates) was accepted as a firmware signer."""
    ca = intermediate(vendor.root, "signing CA", eku=[ExtendedKeyUsageOID.CODE_SIGNING])
    signer = Signer(key=ca.key, certs=(ca.cert,))
    with pytest.raises(ChainValidationError, match="cA must not be asserted in an EE"):
        check(make_bundle(PAYLOAD, [signer]), vendor)


@pytest.mark.parametrize(
    ("usage", "accepted"),
    [
        ({"digital_signature": True}, True),
        ({"key_encipherment": True}, False),
        ({"key_agreement": True}, False),
        ({"digital_signature": True, "key_cert_sign": True}, False),
    ],
)
def test_signer_key_usage(vendor: Vendor, usage: dict[str, bool], accepted: bool) -> None:
    """Found in review: a signer whose KeyUsage allows only key encipherment was accepted."""
    from tests.support.firmware import new_key

    key = new_key()
    flags = dict.fromkeys(
        ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
         "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"],
        False,
    )  # fmt: skip
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string("CN=signer with key usage"))
        .issuer_name(vendor.root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=5))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(vendor.root.key.public_key()),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        .add_extension(x509.KeyUsage(**{**flags, **usage}), critical=True)
        .sign(vendor.root.key, hashes.SHA256())
    )
    data = make_bundle(PAYLOAD, [Signer(key=key, certs=(cert,))])
    if accepted:
        check(data, vendor)
    else:
        with pytest.raises(ChainValidationError, match="does not chain"):
            check(data, vendor)
