"""`firmware crl refresh` against local HTTP and HTTPS servers: the CRLs named by the CRL
issuers' distribution points and by `firmware.crl_urls` are fetched, judged and stored in
`firmware.crl_dir`, and the verifier then refuses a revoked signer. A CRL with a bad signature,
from the wrong issuer, expired, not yet valid or older than the stored one is refused in one
line, and the stored CRL is kept byte for byte."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.cli import EXIT_CONFIG, EXIT_TRUST, EXIT_UNAVAILABLE
from agent.firmware.crl import crl_file_name
from tests.support.ca import TestCA, pem
from tests.support.firmware import Rig, Vendor, cli, image, make_bundle
from tests.support.fw_http_server import FwServer, Route

NOW = dt.datetime.now(dt.timezone.utc)
PAYLOAD = image(16 * 1024, seed=3)


def make_crl(
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    *,
    number: int | None = 1,
    revoked: tuple[int, ...] = (),
    last: dt.timedelta = dt.timedelta(hours=-1),
    next_: dt.timedelta | None = dt.timedelta(days=7),
) -> bytes:
    builder = x509.CertificateRevocationListBuilder().issuer_name(issuer).last_update(NOW + last)
    if next_ is not None:
        builder = builder.next_update(NOW + next_)
    if number is not None:
        builder = builder.add_extension(x509.CRLNumber(number), critical=False)
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(NOW - dt.timedelta(minutes=5))
            .build()
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@dataclass
class Setup:
    rig: Rig
    vendor: Vendor
    http: FwServer
    https: FwServer

    @property
    def inter_name(self) -> x509.Name:
        return self.vendor.inter.cert.subject

    def serve_inter(self, data: bytes) -> None:
        self.http.routes["/inter.crl"] = Route(body=data)

    def serve_root(self, data: bytes) -> None:
        self.http.routes["/root.crl"] = Route(body=data)

    def stored(self, issuer: x509.Name) -> Path:
        return self.rig.root / "fwcrl" / crl_file_name(issuer)

    def refresh(self) -> tuple[int, str, str]:
        return cli(self.rig.config, "crl", "refresh")


def inter_with_cdp(vendor: Vendor, url: str) -> x509.Certificate:
    """The intermediate's certificate again (same name and key), naming where the root's CRL is."""
    inter = vendor.inter.cert
    return (
        x509.CertificateBuilder()
        .subject_name(inter.subject)
        .issuer_name(vendor.root.cert.subject)
        .public_key(vendor.inter.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.CRLDistributionPoints(
                [x509.DistributionPoint([x509.UniformResourceIdentifier(url)], None, None, None)]
            ),
            critical=False,
        )
        .sign(vendor.root.key, hashes.SHA256())  # type: ignore[arg-type]
    )


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    vendor = Vendor()
    rig = Rig(tmp_path / "dev", vendor=vendor, bootloader="file")
    tls_ca = TestCA(name="download CA")
    (tmp_path / "srv").mkdir()
    with FwServer(None) as http, FwServer(tls_ca.server_identity(tmp_path / "srv")) as https:
        issuers = tmp_path / "crl-issuers.pem"
        issuers.write_bytes(pem(inter_with_cdp(vendor, http.url("/root.crl", "127.0.0.1"))))
        with rig.config.open("a") as f:
            f.write(
                f'crl_issuers = "{issuers}"\n'
                f'crl_urls = ["{http.url("/inter.crl", "127.0.0.1")}"]\n'
                f'download_ca = "{tls_ca.write_cert(tmp_path / "download-ca.pem")}"\n'
            )
        s = Setup(rig=rig, vendor=vendor, http=http, https=https)
        s.serve_root(make_crl(vendor.root.cert.subject, vendor.root.key))  # type: ignore[arg-type]
        s.serve_inter(make_crl(s.inter_name, vendor.inter.key))  # type: ignore[arg-type]
        yield s


def test_refresh_stores_the_crls_and_the_verifier_uses_them(setup: Setup) -> None:
    revoked = setup.vendor.make_signer()
    bundle = setup.rig.write_bundle(make_bundle(PAYLOAD, [revoked]))
    assert cli(setup.rig.config, "verify", str(bundle))[0] == 0
    setup.serve_inter(
        make_crl(
            setup.inter_name, setup.vendor.inter.key, revoked=(revoked.certs[0].serial_number,)
        )  # type: ignore[arg-type]
    )
    code, out, err = setup.refresh()
    assert (code, err) == (0, "")
    lines = out.strip().splitlines()
    assert len(lines) == 2 and all("next update" in line for line in lines)
    assert "/root.crl: issuer CN=firmware root, CRL number 1, 0 revoked" in lines[0]
    assert "/inter.crl: issuer CN=firmware intermediate, CRL number 1, 1 revoked" in lines[1]
    assert setup.stored(setup.inter_name).stat().st_mode & 0o777 == 0o644
    code, _, err = cli(setup.rig.config, "verify", str(bundle))
    assert code == EXIT_TRUST and "is revoked" in err
    good = setup.rig.write_bundle(make_bundle(PAYLOAD, [setup.vendor.signer]), "good.fw")
    assert cli(setup.rig.config, "install", str(good))[0] == 0


def refused_keeps_the_old(setup: Setup, data: bytes, message: str) -> None:
    assert setup.refresh()[0] == 0
    before = setup.stored(setup.inter_name).read_bytes()
    setup.serve_inter(data)
    code, out, err = setup.refresh()
    assert code == EXIT_TRUST, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "the stored CRL is kept" in lines[0], err
    assert "/root.crl" in out  # the other CRL was still refreshed
    assert setup.stored(setup.inter_name).read_bytes() == before


def test_bad_signature(setup: Setup) -> None:
    forged = make_crl(setup.inter_name, ec.generate_private_key(ec.SECP256R1()), number=9)
    refused_keeps_the_old(setup, forged, "has a bad signature")


def test_wrong_issuer(setup: Setup) -> None:
    stranger = TestCA(name="stranger")
    refused_keeps_the_old(
        setup,
        make_crl(stranger.cert.subject, stranger.key),  # type: ignore[arg-type]
        "is from the wrong issuer: CN=stranger",
    )


def test_expired(setup: Setup) -> None:
    data = make_crl(
        setup.inter_name,
        setup.vendor.inter.key,  # type: ignore[arg-type]
        number=2,
        last=dt.timedelta(days=-9),
        next_=dt.timedelta(days=-2),
    )
    refused_keeps_the_old(setup, data, "is expired")


def test_not_yet_valid(setup: Setup) -> None:
    data = make_crl(setup.inter_name, setup.vendor.inter.key, number=2, last=dt.timedelta(days=1))  # type: ignore[arg-type]
    refused_keeps_the_old(setup, data, "is not yet valid")


def test_older_than_the_stored_one(setup: Setup) -> None:
    setup.serve_inter(make_crl(setup.inter_name, setup.vendor.inter.key, number=5))  # type: ignore[arg-type]
    older = make_crl(setup.inter_name, setup.vendor.inter.key, number=4)  # type: ignore[arg-type]
    refused_keeps_the_old(setup, older, "is older than the stored one: CRL number 4 < 5")


def test_not_a_crl(setup: Setup) -> None:
    refused_keeps_the_old(setup, b"<html>captive portal</html>", "is not a valid CRL")


def test_a_failed_download_keeps_the_old(setup: Setup) -> None:
    assert setup.refresh()[0] == 0
    before = setup.stored(setup.inter_name).read_bytes()
    del setup.http.routes["/inter.crl"]
    code, _, err = setup.refresh()
    assert code == EXIT_UNAVAILABLE and "answered 404" in err and "kept" in err
    assert setup.stored(setup.inter_name).read_bytes() == before


def test_over_https(setup: Setup, tmp_path: Path) -> None:
    setup.https.routes["/inter.crl"] = Route(
        body=make_crl(setup.inter_name, setup.vendor.inter.key, number=3)  # type: ignore[arg-type]
    )
    text = setup.rig.config.read_text()
    setup.rig.config.write_text(
        text.replace(setup.http.url("/inter.crl", "127.0.0.1"), setup.https.url("/inter.crl"))
    )
    code, out, err = setup.refresh()
    assert (code, err) == (0, ""), err
    assert "https://localhost" in out and "CRL number 3" in out


def test_nothing_to_refresh(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "dev", bootloader="file")
    code, _, err = cli(rig.config, "crl", "refresh")
    assert code == EXIT_CONFIG and "no CRL to refresh" in err


def test_a_crl_issuer_not_below_an_anchor_is_a_config_error(setup: Setup, tmp_path: Path) -> None:
    stray = tmp_path / "stray.pem"
    stray.write_bytes(pem(TestCA(name="stray").cert))
    text = setup.rig.config.read_text()
    setup.rig.config.write_text(text.replace(str(tmp_path / "crl-issuers.pem"), str(stray)))
    code, _, err = setup.refresh()
    assert code == EXIT_CONFIG and "CN=stray is not issued by a firmware trust anchor" in err


def test_without_crl_numbers_an_earlier_this_update_is_older(setup: Setup) -> None:
    key = setup.vendor.inter.key
    setup.serve_inter(make_crl(setup.inter_name, key, number=None))  # type: ignore[arg-type]
    older = make_crl(setup.inter_name, key, number=None, last=dt.timedelta(hours=-2))  # type: ignore[arg-type]
    refused_keeps_the_old(setup, older, "is older than the stored one: thisUpdate")
