"""RFC 5280 path validation (agent.pkix): pure checks over certificates and `now`."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.pkix import PathError, validate_path
from tests.support.ca import CaShape, TestCA, openssl_root, utcnow

SKEW = dt.timedelta(minutes=5)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _validate(leaf: x509.Certificate, root: TestCA, *intermediates: TestCA, **kw: object):  # type: ignore[no-untyped-def]
    return validate_path(
        leaf,
        anchors=[root.cert],
        intermediates=[i.cert for i in intermediates],
        now=kw.pop("now", utcnow()),  # type: ignore[arg-type]
        skew=SKEW,
        **kw,  # type: ignore[arg-type]
    )


def test_chain_is_returned_nearest_first() -> None:
    root = TestCA(name="root")
    sub = TestCA(name="sub", parent=root)
    leaf = sub.issue(_key().public_key(), subject="gw")
    path = _validate(leaf, root, sub)
    assert path.above == (sub.cert, root.cert)


def test_path_len_is_enforced() -> None:
    root = TestCA(name="root", shape=CaShape(path_length=0))
    sub = TestCA(name="sub", parent=root)
    leaf = sub.issue(_key().public_key(), subject="gw")
    with pytest.raises(PathError, match=r"'CN=root' allows 0 intermediate CA\(s\) below it"):
        _validate(leaf, root, sub)


def test_intermediate_without_basic_constraints_cannot_issue() -> None:
    root = TestCA(name="root")
    sub = TestCA(name="sub", parent=root, shape=CaShape(basic_constraints=False))
    leaf = sub.issue(_key().public_key(), subject="gw")
    with pytest.raises(PathError, match="'CN=sub' is not marked as a CA"):
        _validate(leaf, root, sub)


def test_anchor_constraints_are_honoured_when_present() -> None:
    root = TestCA(name="root", shape=CaShape(bc_ca=False))
    leaf = root.issue(_key().public_key(), subject="gw")
    with pytest.raises(PathError, match="trust anchor 'CN=root' is not a CA"):
        _validate(leaf, root)


def test_key_usage_without_key_cert_sign_refused() -> None:
    root = TestCA(name="root")
    sub = TestCA(name="sub", parent=root)
    # re-issue `sub` with a keyUsage lacking keyCertSign
    now = utcnow()
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    sub.cert = (
        x509.CertificateBuilder()
        .subject_name(sub.cert.subject)
        .issuer_name(root.cert.subject)
        .public_key(sub.key.public_key())
        .serial_number(7)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .sign(root.key, hashes.SHA256())
    )
    leaf = sub.issue(_key().public_key(), subject="gw")
    with pytest.raises(PathError, match="keyUsage without keyCertSign"):
        _validate(leaf, root, sub)


def test_ca_extended_key_usage_restricts_the_purpose() -> None:
    root = TestCA(name="root")
    sub = TestCA(name="sub", parent=root, shape=CaShape(eku=(ExtendedKeyUsageOID.SERVER_AUTH,)))
    leaf = sub.issue(_key().public_key(), subject="gw")
    with pytest.raises(
        PathError, match="restricts its extendedKeyUsage to serverAuth, not clientAuth"
    ):
        _validate(leaf, root, sub)
    _validate(leaf, root, sub, purpose=ExtendedKeyUsageOID.SERVER_AUTH)


def test_expired_intermediate_refused() -> None:
    root = TestCA(name="root")
    sub = TestCA(name="sub", parent=root)
    leaf = sub.issue(_key().public_key(), subject="gw", lifetime=dt.timedelta(days=5000))
    with pytest.raises(PathError, match="'CN=sub' expired at"):
        _validate(leaf, root, sub, now=utcnow() + dt.timedelta(days=3700))


def test_same_name_issuers_are_told_apart_by_key() -> None:
    """CA key rollover: two CA certificates with one name; the right key is found."""
    old, new = TestCA(name="EST CA"), TestCA(name="EST CA")
    leaf = new.issue(_key().public_key(), subject="gw")
    path = validate_path(leaf, anchors=[old.cert, new.cert], now=utcnow(), skew=SKEW)
    assert path.above == (new.cert,)
    bare = TestCA(name="EST CA", shape=CaShape(key_ids=False))
    leaf = bare.issue(_key().public_key(), subject="gw")  # no AKI: the signature decides
    other = TestCA(name="EST CA", shape=CaShape(key_ids=False))
    path = validate_path(leaf, anchors=[other.cert, bare.cert], now=utcnow(), skew=SKEW)
    assert path.above == (bare.cert,)


def test_unknown_critical_extension_refused() -> None:
    root = TestCA(name="root")
    now = utcnow()
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw")]))
        .issuer_name(root.cert.subject)
        .public_key(_key().public_key())
        .serial_number(9)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.7"), b"\x05\x00"),
            critical=True,
        )
        .sign(root.key, hashes.SHA256())
    )
    with pytest.raises(PathError, match=r"critical extension .* \(1.3.6.1.4.1.99999.7\)"):
        _validate(leaf, root)


def test_require_explicit_policy_is_refused_not_ignored() -> None:
    root = TestCA(name="root")
    sub = TestCA(name="sub", parent=root)
    now = utcnow()
    sub.cert = (
        x509.CertificateBuilder()
        .subject_name(sub.cert.subject)
        .issuer_name(root.cert.subject)
        .public_key(sub.key.public_key())
        .serial_number(11)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.PolicyConstraints(0, None), critical=True)
        .sign(root.key, hashes.SHA256())
    )
    leaf = sub.issue(_key().public_key(), subject="gw")
    with pytest.raises(PathError, match="requireExplicitPolicy"):
        _validate(leaf, root, sub)


def test_small_rsa_issuer_key_refused() -> None:
    root = TestCA(name="root", key=rsa.generate_private_key(public_exponent=65537, key_size=1024))  # noqa: S505
    leaf = root.issue(_key().public_key(), subject="gw")
    with pytest.raises(PathError, match="RSA key of 1024 bits"):
        _validate(leaf, root)


def _openssl_signed_sub(tmp_path: Path, root: TestCA, digest: str) -> TestCA:
    """An intermediate `root` signs with `openssl x509 -req -<digest>`."""
    key = _key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sha1 sub")]))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "sub.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ext.cnf").write_text("basicConstraints=critical,CA:true\n")
    root_key = tmp_path / "v1-root.key"
    subprocess.run(
        ["openssl", "x509", "-req", "-in", tmp_path / "sub.csr", "-CA", tmp_path / "v1-root.pem",
         "-CAkey", root_key, "-CAcreateserial", f"-{digest}", "-days", "30", "-extfile",
         tmp_path / "ext.cnf", "-out", tmp_path / "sub.pem"],
        check=True, capture_output=True,
    )  # fmt: skip
    cert = x509.load_pem_x509_certificate((tmp_path / "sub.pem").read_bytes())
    return TestCA(name="sha1 sub", key=key, cert=cert, parent=root)


def test_sha1_signature_below_the_anchor_refused(tmp_path: Path) -> None:
    root = openssl_root(tmp_path, "v1 root", kind="v1")
    sub = _openssl_signed_sub(tmp_path, root, "sha1")
    leaf = sub.issue(_key().public_key(), subject="gw")
    with pytest.raises(PathError, match="'CN=sha1 sub' is signed with SHA1, which is refused"):
        _validate(leaf, root, sub)
    good = _openssl_signed_sub(tmp_path, root, "sha256")  # the v1 anchor's own SHA-1 is fine
    _validate(good.issue(_key().public_key(), subject="gw"), root, good)


def test_v1_intermediate_refused(tmp_path: Path) -> None:
    root = TestCA(name="root")
    v1 = openssl_root(tmp_path, "v1 sub", kind="v1")  # self-signed; re-sign under root
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(v1.cert.subject)
        .sign(v1.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    (tmp_path / "c.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    root.write_cert(tmp_path / "root.pem")
    (tmp_path / "root.key").write_bytes(
        root.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    subprocess.run(
        ["openssl", "x509", "-req", "-in", tmp_path / "c.csr", "-CA", tmp_path / "root.pem",
         "-CAkey", tmp_path / "root.key", "-CAcreateserial", "-days", "30",
         "-out", tmp_path / "c.pem"],
        check=True, capture_output=True,
    )  # fmt: skip
    sub = TestCA(
        name="v1 sub",
        key=v1.key,
        cert=x509.load_pem_x509_certificate((tmp_path / "c.pem").read_bytes()),
        parent=root,
        shape=CaShape(key_ids=False),
    )
    assert sub.cert.version is x509.Version.v1
    leaf = sub.issue(_key().public_key(), subject="gw")
    with pytest.raises(PathError, match="'CN=v1 sub' is not marked as a CA"):
        _validate(leaf, root, sub)


CONSTRAINTS = x509.NameConstraints(
    permitted_subtrees=[
        x509.DNSName("devices.example"),
        x509.IPAddress(ipaddress.ip_network("10.0.0.0/8")),
        x509.RFC822Name(".devices.example"),
        x509.UniformResourceIdentifier(".devices.example"),
        x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fleet")])),
    ],
    excluded_subtrees=[x509.IPAddress(ipaddress.ip_network("10.66.0.0/16"))],
)


@pytest.mark.parametrize(
    ("sans", "organization", "error"),
    [
        ([x509.DNSName("gw.devices.example")], "Fleet", None),
        ([x509.DNSName("devices.example")], "Fleet", None),
        ([x509.DNSName("gw.other.example")], "Fleet", "DNSName:gw.other.example is outside"),
        ([x509.IPAddress(ipaddress.ip_address("10.1.2.3"))], "Fleet", None),
        ([x509.IPAddress(ipaddress.ip_address("10.66.2.3"))], "Fleet", "10.66.2.3 is excluded"),
        ([x509.IPAddress(ipaddress.ip_address("192.0.2.1"))], "Fleet", "192.0.2.1 is outside"),
        ([x509.RFC822Name("ops@mail.devices.example")], "Fleet", None),
        ([x509.RFC822Name("ops@devices.example")], "Fleet", "ops@devices.example is outside"),
        ([x509.UniformResourceIdentifier("urn:dev:gw")], "Fleet", "urn:dev:gw is outside"),
        ([x509.UniformResourceIdentifier("https://gw.devices.example/x")], "Fleet", None),
        ([], "Other", "'CN=gw,O=Other' is outside"),
        ([x509.RegisteredID(x509.ObjectIdentifier("1.2.3"))], "Fleet", None),
    ],
)
def test_name_constraints(
    sans: list[x509.GeneralName], organization: str, error: str | None
) -> None:
    root = TestCA(name="root", shape=CaShape(name_constraints=CONSTRAINTS))
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, "gw"),
        ]
    )
    leaf = root.issue(_key().public_key(), subject=subject, sans=sans or None)
    if error is None:
        _validate(leaf, root)
    else:
        with pytest.raises(PathError, match=error.replace(".", r"\.")):
            _validate(leaf, root)


def test_constraint_on_a_name_type_that_cannot_be_checked_refuses() -> None:
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.RegisteredID(x509.ObjectIdentifier("1.2.3"))],
        excluded_subtrees=None,
    )
    root = TestCA(name="root", shape=CaShape(name_constraints=constraints))
    leaf = root.issue(
        _key().public_key(), subject="gw", sans=[x509.RegisteredID(x509.ObjectIdentifier("1.2.3"))]
    )
    with pytest.raises(PathError, match="constrains RegisteredID names, which this agent cannot"):
        _validate(leaf, root)


def test_many_same_named_candidates_are_bounded() -> None:
    root = TestCA(name="root")
    decoys = [TestCA(name="sub", parent=root, shape=CaShape(key_ids=False)) for _ in range(20)]
    real = TestCA(name="sub", parent=root, shape=CaShape(key_ids=False))
    leaf = real.issue(_key().public_key(), subject="gw")
    path = _validate(leaf, root, *decoys, real)  # found among 21 candidates
    assert path.above == (real.cert, root.cert)
    many = [TestCA(name="sub", parent=root, shape=CaShape(key_ids=False)) for _ in range(300)]
    with pytest.raises(PathError, match="within 256 signature checks"):
        _validate(leaf, root, *many)
