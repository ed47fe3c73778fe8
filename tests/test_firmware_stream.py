"""`firmware install|verify https://...` against a local HTTPS server (tests/support/
fw_http_server.py, a test CA): the bundle is streamed through the same verifier, and a bad,
truncated, over-long, trickling, untrusted, redirected-to-http or missing download ends in one
line with its exit code, the booted slot and its boot entry untouched, nothing left on disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import EXIT_CONFIG, EXIT_TRUST, EXIT_UNAVAILABLE
from tests.support.ca import TestCA
from tests.support.firmware import Rig, cli, image, make_bundle
from tests.support.fw_http_server import FwServer, Route

PAYLOAD = image(96 * 1024, seed=7)


@pytest.fixture
def tls_ca(tmp_path: Path) -> TestCA:
    return TestCA(name="download test CA")


@pytest.fixture
def server(tmp_path: Path, tls_ca: TestCA) -> Iterator[FwServer]:
    d = tmp_path / "srv"
    d.mkdir()
    with FwServer(tls_ca.server_identity(d)) as s:
        yield s


def configure(rig: Rig, ca: Path | str, read_timeout: float = 30.0) -> None:
    rig.write_config()
    with rig.config.open("a") as f:  # [firmware] is the config's last section
        f.write(f'download_ca = "{ca}"\ndownload_read_timeout_seconds = {read_timeout}\n')


@pytest.fixture
def rig(tmp_path: Path, tls_ca: TestCA) -> Rig:
    rig = Rig(tmp_path / "dev", bootloader="uboot")
    configure(rig, tls_ca.write_cert(tmp_path / "download-ca.pem"))
    return rig


def booted_side(rig: Rig) -> tuple[bytes, str, str]:
    """The booted slot's bytes and its boot entry: what no failed download may change (a
    download refused after the header may leave slot B marked bad: never half-written and
    bootable)."""
    env = rig.env()
    return rig.slot["A"].read_bytes(), env["BOOT_ORDER"].split()[0], env["BOOT_A_LEFT"]


def refused(rig: Rig, url: str, status: int, message: str) -> None:
    before = booted_side(rig)
    files = disk(rig)
    for command in ("verify", "install"):
        code, out, err = cli(rig.config, command, url)
        lines = err.strip().splitlines()
        assert code == status, (command, err)
        assert len(lines) == 1 and message in lines[0], err
        assert out == ""
    assert booted_side(rig) == before
    assert disk(rig) == files  # no copy of the bundle on disk


def disk(rig: Rig) -> set[str]:
    """The rig's files, apart from root's small state files (records, lock, snapshot)."""
    found = set()
    for p in rig.root.rglob("*"):
        if p.is_file() and not (
            p.parent.name in ("fwstate", "fwpublic") and p.stat().st_size < 8192
        ):
            found.add(str(p.relative_to(rig.root)))
    return found


def test_install_streams_a_good_bundle(rig: Rig, server: FwServer) -> None:
    server.routes["/fw/good.fw"] = Route(body=make_bundle(PAYLOAD, [rig.vendor.signer]))
    code, out, err = cli(rig.config, "verify", server.url("/fw/good.fw"))
    assert (code, err) == (0, ""), err
    assert "OK: acme-gw-imx8 1.0.0" in out
    code, out, err = cli(rig.config, "install", server.url("/fw/good.fw?token=secret"))
    assert (code, err) == (0, ""), err
    assert "into slot B" in out
    assert rig.slot["B"].read_bytes()[: len(PAYLOAD)] == PAYLOAD
    assert rig.reboot() == "B"
    assert cli(rig.config, "commit")[0] == 0


def test_a_changed_payload_byte_is_refused(rig: Rig, server: FwServer) -> None:
    data = bytearray(make_bundle(PAYLOAD, [rig.vendor.signer]))
    data[-100] ^= 1
    server.routes["/bad.fw"] = Route(body=bytes(data))
    refused(rig, server.url("/bad.fw"), EXIT_TRUST, "does not match the manifest")


def test_an_unsigned_header_touches_no_slot(rig: Rig, server: FwServer) -> None:
    other = Rig(rig.root.parent / "other").vendor.signer  # a signer of another PKI
    server.routes["/foreign.fw"] = Route(body=make_bundle(PAYLOAD, [other]))
    before = rig.snapshot()
    code, _, err = cli(rig.config, "install", server.url("/foreign.fw"))
    assert code == EXIT_TRUST and "does not chain" in err
    assert rig.snapshot() == before  # refused at the header: nothing written at all


def test_truncated_download(rig: Rig, server: FwServer) -> None:
    body = make_bundle(PAYLOAD, [rig.vendor.signer])
    server.routes["/cut.fw"] = Route(body=body, cut=len(body) - 5000)
    refused(rig, server.url("/cut.fw"), EXIT_UNAVAILABLE, "broke off after")


def test_a_short_bundle_without_length_is_truncated(rig: Rig, server: FwServer) -> None:
    body = make_bundle(PAYLOAD, [rig.vendor.signer])
    server.routes["/short.fw"] = Route(body=body[:-1], no_length=True)
    refused(rig, server.url("/short.fw"), EXIT_TRUST, "payload is truncated")


def test_over_long_download(rig: Rig, server: FwServer) -> None:
    """Its Content-Length says so before the payload: refused before any slot is touched."""
    server.routes["/long.fw"] = Route(body=make_bundle(PAYLOAD, [rig.vendor.signer]) + b"x" * 9)
    before = rig.snapshot()
    refused(rig, server.url("/long.fw"), EXIT_TRUST, "the download announces 98313 payload bytes")
    assert rig.snapshot() == before


def test_over_long_download_without_length(rig: Rig, server: FwServer) -> None:
    body = make_bundle(PAYLOAD, [rig.vendor.signer]) + b"x" * 9
    server.routes["/long.fw"] = Route(body=body, no_length=True)
    refused(rig, server.url("/long.fw"), EXIT_TRUST, "payload is longer than")


def test_a_short_content_length_is_refused_before_writing(rig: Rig, server: FwServer) -> None:
    server.routes["/short.fw"] = Route(body=make_bundle(PAYLOAD, [rig.vendor.signer])[:-1])
    before = rig.snapshot()
    refused(rig, server.url("/short.fw"), EXIT_TRUST, "announces 98303 payload bytes")
    assert rig.snapshot() == before


def test_a_trickling_server_times_out(rig: Rig, server: FwServer, tmp_path: Path) -> None:
    configure(rig, rig.root.parent / "download-ca.pem", read_timeout=0.3)
    server.routes["/slow.fw"] = Route(
        body=make_bundle(PAYLOAD, [rig.vendor.signer]), trickle_seconds=1.0
    )
    refused(rig, server.url("/slow.fw"), EXIT_UNAVAILABLE, "no data within the read timeout")


def test_a_server_of_another_ca_is_not_trusted(rig: Rig, server: FwServer, tmp_path: Path) -> None:
    configure(rig, TestCA(name="another CA").write_cert(tmp_path / "other-ca.pem"))
    server.routes["/good.fw"] = Route(body=make_bundle(PAYLOAD, [rig.vendor.signer]))
    refused(rig, server.url("/good.fw"), EXIT_TRUST, "is not trusted by firmware.download_ca")


def test_redirects_go_to_https_only(rig: Rig, server: FwServer) -> None:
    server.routes["/good.fw"] = Route(body=make_bundle(PAYLOAD, [rig.vendor.signer]))
    server.routes["/to-https"] = Route(status=302, location="/good.fw")
    server.routes["/to-http"] = Route(status=301, location=server.url("/good.fw").replace(
        "https:", "http:"))  # fmt: skip
    refused(rig, server.url("/to-http"), EXIT_UNAVAILABLE, "redirects to http://")
    assert cli(rig.config, "verify", server.url("/to-https"))[0] == 0


def test_not_found(rig: Rig, server: FwServer) -> None:
    refused(rig, server.url("/missing.fw"), EXIT_UNAVAILABLE, "answered 404 Not Found")


def test_plain_http_and_no_download_ca_are_refused(rig: Rig, tmp_path: Path) -> None:
    refused(rig, "http://127.0.0.1:9/x.fw", EXIT_CONFIG, "only https:// URLs")
    plain = Rig(tmp_path / "plain", bootloader="file")
    code, _, err = cli(plain.config, "install", "https://127.0.0.1:9/x.fw")
    assert code == EXIT_CONFIG and "firmware.download_ca is not set" in err


def test_query_strings_stay_out_of_messages(rig: Rig, server: FwServer) -> None:
    code, _, err = cli(rig.config, "install", server.url("/missing.fw?X-Amz-Signature=s3cr3t"))
    assert code == EXIT_UNAVAILABLE and "s3cr3t" not in err and "/missing.fw" in err


def test_the_system_store_is_used_only_when_configured_and_warned(
    rig: Rig, server: FwServer, caplog: pytest.LogCaptureFixture
) -> None:
    configure(rig, "system")
    server.routes["/good.fw"] = Route(body=make_bundle(PAYLOAD, [rig.vendor.signer]))
    code, _, err = cli(rig.config, "verify", server.url("/good.fw"))
    assert code == EXIT_TRUST  # the test CA is in no system store
    assert "is not trusted by firmware.download_ca" in err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any('firmware.download_ca = "system": any CA in the system store' in w for w in warnings)


def test_download_ca_is_a_root_used_path(rig: Rig) -> None:
    from agent.config import load_config
    from agent.firmware.root_paths import root_used_paths

    keys = dict(root_used_paths(load_config(rig.config)))
    assert keys["firmware.download_ca"] == rig.root.parent / "download-ca.pem"
    assert keys["firmware.crl_dir"] == rig.root / "fwcrl"
    configure(rig, "system")
    assert "firmware.download_ca" not in dict(root_used_paths(load_config(rig.config)))
