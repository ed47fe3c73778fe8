"""CA shapes real private PKIs produce: each one enrolls and renews against our EST server.

The agent trusts the root (as `est.trust_anchor`); the server's TLS certificate and the device
certificate are issued under it, so both the TLS check (OpenSSL) and the response check
(agent.pkix) see the shape. Software keys, in-process: fast.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent import wiring
from agent.config import parse_config
from agent.enroll import Enroller
from agent.errors import ChainValidationError, EnrollmentError, TrustError
from hal.softkeys import SoftwareKeyStore
from tests.support.ca import CaShape, LeafProfile, TestCA, openssl_root
from tests.support.enroll_env import config_text, snapshot
from tests.support.est_server import EstOptions, EstServer, Pki


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _p384() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


NAME_CONSTRAINTS = x509.NameConstraints(
    permitted_subtrees=[
        x509.DNSName("localhost"),
        x509.DNSName("devices.example"),
        x509.IPAddress(ipaddress.ip_network("127.0.0.0/8")),
    ],
    excluded_subtrees=[x509.DNSName("forbidden.devices.example")],
)


def _v1_root(tmp: Path) -> Pki:
    return Pki(issuing=openssl_root(tmp, "v1 root", kind="v1"))


def _v1_root_ec_intermediate(tmp: Path) -> Pki:
    root = openssl_root(tmp, "v1 root", kind="v1")
    return Pki(issuing=TestCA(name="issuing under v1", parent=root))


def _no_key_usage(tmp: Path) -> Pki:
    return Pki(issuing=TestCA(name="root without keyUsage", shape=CaShape(key_usage=False)))


def _est_example_like(tmp: Path) -> Pki:
    # the demo CA of a widely deployed EST server: non-critical basicConstraints, no keyUsage
    shape = CaShape(bc_critical=False, key_usage=False)
    return Pki(issuing=TestCA(name="estExampleCA", shape=shape))


def _non_critical_bc_intermediate(tmp: Path) -> Pki:
    root = TestCA(name="root")
    return Pki(issuing=TestCA(name="sub", parent=root, shape=CaShape(bc_critical=False)))


def _no_key_ids(tmp: Path) -> Pki:
    root = TestCA(name="root without key ids", shape=CaShape(key_ids=False))
    sub = TestCA(name="sub without key ids", parent=root, shape=CaShape(key_ids=False))
    return Pki(issuing=sub, leaf=LeafProfile(key_ids=False))


def _openssl_default(tmp: Path) -> Pki:
    return Pki(issuing=openssl_root(tmp, "openssl req -x509 root"))


def _path_len_zero(tmp: Path) -> Pki:
    root = TestCA(name="root pathLen 1", shape=CaShape(path_length=1))
    return Pki(issuing=TestCA(name="issuing pathLen 0", parent=root, shape=CaShape(path_length=0)))


def _rsa_root_ec_issuing(tmp: Path) -> Pki:
    root = TestCA(name="RSA root", key=_rsa())
    return Pki(issuing=TestCA(name="EC issuing", parent=root))


def _p384_root_rsa_issuing(tmp: Path) -> Pki:
    root = TestCA(name="P-384 root", key=_p384())
    return Pki(issuing=TestCA(name="RSA issuing", parent=root, key=_rsa()))


def _rsa_only(tmp: Path) -> Pki:
    root = TestCA(name="RSA root", key=_rsa())
    return Pki(issuing=TestCA(name="RSA issuing", parent=root, key=_rsa()))


def _sha1_root(tmp: Path) -> Pki:
    root = openssl_root(tmp, "SHA-1 root", kind="sha1")
    return Pki(issuing=TestCA(name="SHA-256 issuing", parent=root))


def _name_constraints(tmp: Path) -> Pki:
    root = TestCA(name="constrained root", shape=CaShape(name_constraints=NAME_CONSTRAINTS))
    return Pki(issuing=TestCA(name="constrained issuing", parent=root))


def _ejbca_like(tmp: Path) -> Pki:
    root = TestCA(name="ManagementCA", shape=CaShape(profile="ejbca", path_length=None))
    sub = TestCA(name="DeviceSubCA", parent=root, shape=CaShape(profile="ejbca", path_length=0))
    return Pki(issuing=sub)


def _adcs_like(tmp: Path) -> Pki:
    root = TestCA(name="corp-ROOT-CA", key=_rsa(), shape=CaShape(profile="adcs", key_usage=False))
    sub = TestCA(name="corp-ISSUING-CA", parent=root, key=_rsa(), shape=CaShape(profile="adcs"))
    return Pki(issuing=sub, leaf=LeafProfile(profile="adcs"))


def _ca_with_eku(tmp: Path) -> Pki:
    root = TestCA(name="root")
    eku = (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH)
    return Pki(issuing=TestCA(name="issuing with EKU", parent=root, shape=CaShape(eku=eku)))


def _leaf_without_eku_or_key_usage(tmp: Path) -> Pki:
    return Pki(issuing=TestCA(name="plain root"), leaf=LeafProfile(eku=(), key_usage=False))


def _tls_from_another_branch(tmp: Path) -> Pki:
    root = TestCA(name="root", shape=CaShape(bc_critical=False, key_usage=False))
    devices = TestCA(name="device CA", parent=root, shape=CaShape(path_length=0))
    servers = TestCA(name="server CA", parent=root, shape=CaShape(path_length=0))
    return Pki(issuing=devices, tls_issuer=servers)


SHAPES: dict[str, Callable[[Path], Pki]] = {
    "v1-root": _v1_root,
    "v1-root-ec-intermediate": _v1_root_ec_intermediate,
    "root-without-key-usage": _no_key_usage,
    "est-example-like-root": _est_example_like,
    "non-critical-bc-intermediate": _non_critical_bc_intermediate,
    "no-ski-aki": _no_key_ids,
    "openssl-req-x509-default": _openssl_default,
    "path-len-0-intermediate": _path_len_zero,
    "rsa-root-ec-issuing": _rsa_root_ec_issuing,
    "p384-root-rsa-issuing": _p384_root_rsa_issuing,
    "rsa-only": _rsa_only,
    "sha1-signed-root-anchor": _sha1_root,
    "name-constraints": _name_constraints,
    "ejbca-like": _ejbca_like,
    "adcs-like": _adcs_like,
    "issuing-ca-with-eku": _ca_with_eku,
    "leaf-without-eku-or-key-usage": _leaf_without_eku_or_key_usage,
    "tls-cert-from-another-branch": _tls_from_another_branch,
}

#: the subjects and SANs a device asks for (both copied into the certificate by the server)
SUBJECTS = {
    "cn-with-san": '[subject]\nsan_dns = ["{device_id}.devices.example"]\n',
    "serial-number-without-san": "[subject]\ncommon_name = false\nserial_number = true\n",
    "cn-and-serial-number": "[subject]\nserial_number = true\n",
}


def _enroller(tmp_path: Path, est: EstServer, subject: str) -> Enroller:
    text = config_text(state_dir=tmp_path / "state", est=est, store="software") + subject
    config = parse_config(text, source=tmp_path / "config.toml")
    return wiring.enroller(config, key_store=SoftwareKeyStore(), clock=_Clock())


class _Clock:
    def now(self):  # type: ignore[no-untyped-def]
        from tests.support.ca import utcnow

        return utcnow()

    def monotonic(self) -> float:
        import time

        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        raise AssertionError("no sleeping here")


@pytest.fixture(params=sorted(SHAPES))
def shaped(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EstServer]:
    pki = SHAPES[request.param](tmp_path / "pki")
    with EstServer(tmp_path / "est", EstOptions(), pki=pki) as server:
        yield server


@pytest.mark.parametrize("subject", sorted(SUBJECTS))
def test_enroll_and_renew(shaped: EstServer, tmp_path: Path, subject: str) -> None:
    enroller = _enroller(tmp_path, shaped, SUBJECTS[subject])
    first = enroller.enroll()
    assert first.changed
    cert = first.identity.certificate
    assert cert.issuer == shaped.ca.cert.subject
    expected_chain = [c.subject for c in shaped.ca.chain()]
    chain = x509.load_pem_x509_certificates(first.identity.chain_file.read_bytes())
    assert [c.subject for c in chain] == expected_chain
    if subject == "cn-with-san":
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["gw-0001.devices.example"]
    else:
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        serial = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
        assert [a.value for a in serial] == ["gw-0001"]
    renewed = enroller.renew()
    assert renewed.changed and renewed.identity.generation == first.identity.generation + 1
    assert renewed.identity.certificate.subject == cert.subject
    assert [r.operation for r in shaped.records if r.status == 200][-1] == "simplereenroll"


# -- what stays refused, each with its one line --------------------------------------------------


REFUSALS = {
    "ca-cert": (EnrollmentError, r"^the issued certificate is a CA certificate"),
    "other-key": (TrustError, r"^the issued certificate is for another key"),
    "expired": (ChainValidationError, r"^the issued certificate expired at "),
    "not-yet-valid": (ChainValidationError, r"^the issued certificate is not valid before "),
    "server-eku": (EnrollmentError, r"extendedKeyUsage does not allow clientAuth$"),
    "issuer-not-ca": (
        ChainValidationError,
        r"does not chain to the EST CA certificates: the CA certificate 'CN=devid not a CA' is "
        r"not a CA \(basicConstraints cA=FALSE\) and cannot issue 'CN=gw-0001'$",
    ),
    "wrong-issuer": (ChainValidationError, r"no issuer 'CN=devid rogue CA' among the CA"),
}


@pytest.mark.parametrize("fault", sorted(REFUSALS))
def test_refusals_hold_with_one_line(tmp_path: Path, fault: str) -> None:
    kind, pattern = REFUSALS[fault]
    with EstServer(tmp_path / "est", EstOptions(fault=fault)) as est:
        enroller = _enroller(tmp_path, est, "")
        with pytest.raises(kind, match=pattern) as info:
            enroller.enroll()
    assert "\n" not in str(info.value)
    assert snapshot(tmp_path / "state") == {}


def test_name_constraints_refuse_a_device_name_outside_them(tmp_path: Path) -> None:
    pki = _name_constraints(tmp_path / "pki")
    with EstServer(tmp_path / "est", EstOptions(), pki=pki) as est:
        subject = '[subject]\nsan_dns = ["{device_id}.elsewhere.example"]\n'
        with pytest.raises(ChainValidationError, match="outside the permitted nameConstraints"):
            _enroller(tmp_path, est, subject).enroll()
        subject = '[subject]\nsan_dns = ["{device_id}.forbidden.devices.example"]\n'
        with pytest.raises(ChainValidationError, match="excluded by the nameConstraints"):
            _enroller(tmp_path, est, subject).enroll()
    assert snapshot(tmp_path / "state") == {}


@pytest.mark.parametrize("shape", ["v1-root", "est-example-like-root", "sha1-signed-root-anchor"])
def test_fingerprint_bootstrap_of_the_shape(tmp_path: Path, shape: str) -> None:
    pki = SHAPES[shape](tmp_path / "pki")
    with EstServer(tmp_path / "est", EstOptions(), pki=pki) as est:
        text = config_text(
            state_dir=tmp_path / "state",
            est=est,
            store="software",
            trust_anchor="",
            bootstrap_fingerprint_sha256=est.ca_fingerprint,
        )
        config = parse_config(text, source=tmp_path / "config.toml")
        enroller = wiring.enroller(config, key_store=SoftwareKeyStore(), clock=_Clock())
        assert enroller.enroll().changed
        assert (tmp_path / "state" / "est-anchor.pem").read_bytes() == est.ca_file.read_bytes()
