"""Mutual TLS with TPM keys (through the tpm2 OpenSSL provider) and with software keys, against a
local server that requires client certificates."""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.errors import ConfigError
from agent.tls import client_context
from hal.interfaces import KeyAlgorithm, KeyStore
from hal.softkeys import SoftwareKeyStore
from hal.tpm import TpmKeyStore
from tests.conftest import ROOT, provider_path
from tests.support.ca import TestCA, pem
from tests.support.swtpm import Swtpm
from tests.support.tls_server import MutualTlsServer, handshake

VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def issue_client(
    store: KeyStore, ca: TestCA, directory: Path, algorithm: KeyAlgorithm
) -> tuple[Path, Path]:
    blob = store.generate(algorithm)
    key_path = directory / store.key_file_name
    key_path.write_bytes(blob)
    cert = ca.issue(
        store.public_key(blob),  # type: ignore[arg-type]
        subject=f"device-{algorithm.value}",
        eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    cert_path = directory / "cert.pem"
    cert_path.write_bytes(pem(cert))
    return cert_path, key_path


@pytest.fixture
def pki(tmp_path: Path, test_ca: TestCA) -> tuple[TestCA, Path, Path, Path]:
    ca_file = test_ca.write_cert(tmp_path / "ca.pem")
    server_cert, server_key = test_ca.server_identity(tmp_path)
    return test_ca, ca_file, server_cert, server_key


@pytest.mark.parametrize("version", list(VERSIONS))
@pytest.mark.parametrize("algorithm", list(KeyAlgorithm), ids=lambda a: a.value)
def test_mutual_tls_with_tpm_key(
    tpm2_provider: Swtpm, pki: tuple[TestCA, Path, Path, Path], tmp_path: Path,
    algorithm: KeyAlgorithm, version: str,
) -> None:  # fmt: skip
    ca, ca_file, server_cert, server_key = pki
    store = TpmKeyStore(tcti=tpm2_provider.tcti)
    cert, key = issue_client(store, ca, tmp_path, algorithm)
    assert key.read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    ctx = client_context(ca_file=ca_file, cert_file=cert, key_file=key)
    with MutualTlsServer(
        cert=server_cert, key=server_key, client_ca=ca_file, tls_version=VERSIONS[version]
    ) as server:
        assert handshake(ctx, server.port) == f"{version} device-{algorithm.value}"
    assert server.errors == []


@pytest.mark.parametrize("version", list(VERSIONS))
def test_mutual_tls_with_software_key(
    pki: tuple[TestCA, Path, Path, Path], tmp_path: Path, version: str
) -> None:
    ca, ca_file, server_cert, server_key = pki
    cert, key = issue_client(SoftwareKeyStore(), ca, tmp_path, KeyAlgorithm.EC_P256)
    ctx = client_context(ca_file=ca_file, cert_file=cert, key_file=key)
    with MutualTlsServer(
        cert=server_cert, key=server_key, client_ca=ca_file, tls_version=VERSIONS[version]
    ) as server:
        assert handshake(ctx, server.port) == f"{version} device-ec-p256"


def test_min_version_13_refuses_a_12_only_server(pki: tuple[TestCA, Path, Path, Path]) -> None:
    _, ca_file, server_cert, server_key = pki
    ctx = client_context(ca_file=ca_file, min_version="1.3")
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
    with (
        MutualTlsServer(
            cert=server_cert, key=server_key, client_ca=ca_file, tls_version=ssl.TLSVersion.TLSv1_2
        ) as server,
        pytest.raises(ssl.SSLError),
    ):
        handshake(ctx, server.port)


def test_defaults_are_strict(pki: tuple[TestCA, Path, Path, Path]) -> None:
    _, ca_file, _, _ = pki
    ctx = client_context(ca_file=ca_file)
    assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.check_hostname is True
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    # Only the explicit anchor is trusted, never the system store.
    assert len(ctx.get_ca_certs()) == 1


def test_server_from_another_ca_is_refused(
    pki: tuple[TestCA, Path, Path, Path], tmp_path: Path
) -> None:
    _, ca_file, _, _ = pki
    other = TestCA(name="somebody else")
    (tmp_path / "other").mkdir()
    server_cert, server_key = other.server_identity(tmp_path / "other")
    other_ca = other.write_cert(tmp_path / "other" / "ca.pem")
    ctx = client_context(ca_file=ca_file)
    with (
        MutualTlsServer(cert=server_cert, key=server_key, client_ca=other_ca) as server,
        pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"),
    ):
        handshake(ctx, server.port)


def test_hostname_is_checked(pki: tuple[TestCA, Path, Path, Path]) -> None:
    _, ca_file, server_cert, server_key = pki
    ctx = client_context(ca_file=ca_file)
    with (
        MutualTlsServer(cert=server_cert, key=server_key, client_ca=ca_file) as server,
        pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"),
    ):
        handshake(ctx, server.port, host="est.example.com")


def test_missing_trust_anchor_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot load trust anchor file .*missing\.pem"):
        client_context(ca_file=tmp_path / "missing.pem")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The provider loads once per process: provider failures are tested in fresh processes."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
        env={**os.environ, **env},
    )  # fmt: skip


PROVIDER_ERROR = """
    import sys
    from agent.errors import ProviderError
    from hal.openssl_provider import load_tpm2_provider
    try:
        load_tpm2_provider(sys.argv[1] if len(sys.argv) > 1 else {path!r}, tcti={tcti!r})
    except ProviderError as e:
        print(e)
    else:
        print("loaded")
"""


def test_missing_provider_says_what_to_install(swtpm: Swtpm, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "tpm2.so"
    result = run_python(PROVIDER_ERROR.format(path=str(missing), tcti=swtpm.tcti))
    assert result.stdout.strip() == (
        f"TPM-backed TLS needs the tpm2 OpenSSL provider, not found at {missing}; install "
        "tpm2-openssl >= 1.2 (Debian 13's package works on Debian 12; `make setup` unpacks it "
        "into .deps/) and name its tpm2.so in tpm.openssl_provider"
    )


def test_old_provider_is_refused_with_reason(swtpm: Swtpm) -> None:
    old_dir = ROOT / ".deps" / "tpm2-openssl-old"
    old = next(old_dir.rglob("tpm2.so"))
    version = (old_dir / "VERSION").read_text().split("-")[0]
    result = run_python(PROVIDER_ERROR.format(path=str(old), tcti=swtpm.tcti))
    line = result.stdout.strip()
    assert line.startswith(f"found tpm2 OpenSSL provider {version} at {old}; versions before 1.2")
    assert "missing private key" in line and "install tpm2-openssl >= 1.2" in line


def test_new_provider_loads_and_reports_its_version(swtpm: Swtpm) -> None:
    code = f"""
        from hal.openssl_provider import load_tpm2_provider
        info = load_tpm2_provider({str(provider_path())!r}, tcti={swtpm.tcti!r})
        print(info.version)
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    major, minor = (int(x) for x in result.stdout.strip().split(".")[:2])
    assert (major, minor) >= (1, 2)


def test_tpm_key_without_provider_is_a_clear_error(tmp_path: Path) -> None:
    key = tmp_path / "key.tss2.pem"
    key.write_bytes(b"-----BEGIN TSS2 PRIVATE KEY-----\nAAAA\n-----END TSS2 PRIVATE KEY-----\n")
    code = f"""
        import ssl
        from pathlib import Path
        from agent.errors import ProviderError
        from agent.tls import load_client_identity
        try:
            load_client_identity(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), Path("c.pem"), Path({str(key)!r}))
        except ProviderError as e:
            print(e)
    """
    result = run_python(code)
    assert result.stdout.strip() == (
        f"{key} is a TPM key, but the tpm2 OpenSSL provider is not loaded into this process; "
        "TPM-backed TLS needs it (see tpm.openssl_provider)"
    )


@pytest.mark.parametrize(
    ("text", "parsed", "usable"),
    [
        ("1.3.0", (1, 3, 0), True),
        ("1.2.0", (1, 2, 0), True),
        ("1.2.0-rc1", (1, 2, 0), True),
        ("v1.2", (1, 2), True),
        ("1.10.1", (1, 10, 1), True),
        ("1.1.1", (1, 1, 1), False),
        ("1.1rc2", (1, 1), False),  # was (1, 12): an old release candidate passed as >= 1.2
        ("1.1-2", (1, 1), False),  # was (1, 12)
        ("unknown", (), False),
        ("", (), False),
    ],
)
def test_provider_version_parsing(text: str, parsed: tuple[int, ...], usable: bool) -> None:
    from hal.openssl_provider import parse_version, version_problem

    assert parse_version(text) == parsed
    assert (version_problem(text, "/x/tpm2.so") is None) is usable


def test_provider_without_a_version_is_refused_clearly() -> None:
    from hal.openssl_provider import version_problem

    assert version_problem("unknown", "/x/tpm2.so") == (
        "the OpenSSL provider at /x/tpm2.so does not report a version ('unknown'), so it is "
        "treated as older than 1.2; versions before 1.2 cannot sign TLS handshakes with a TPM key "
        "(OpenSSL reports 'missing private key'); install tpm2-openssl >= 1.2 (Debian 13's "
        "package works on Debian 12; `make setup` unpacks it into .deps/) and name its tpm2.so "
        "in tpm.openssl_provider"
    )


def test_refused_provider_is_unloaded_and_a_good_one_loads_after(swtpm: Swtpm) -> None:
    """A refused 1.1 provider used to stay loaded, with its decoders still claiming TSS2 keys,
    and TPM2OPENSSL_TCTI stayed overwritten."""
    old = next((ROOT / ".deps" / "tpm2-openssl-old").rglob("tpm2.so"))
    code = f"""
        import ctypes, os
        from agent.errors import ProviderError
        from hal.openssl_provider import load_tpm2_provider
        os.environ["TPM2OPENSSL_TCTI"] = "inherited"
        try:
            load_tpm2_provider({str(old)!r}, tcti={swtpm.tcti!r})
        except ProviderError:
            pass
        lib = ctypes.CDLL("libcrypto.so.3")
        lib.OSSL_PROVIDER_available.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        print(lib.OSSL_PROVIDER_available(None, {str(old)!r}.encode()), os.environ["TPM2OPENSSL_TCTI"])
        info = load_tpm2_provider({str(provider_path())!r}, tcti={swtpm.tcti!r})
        print(info.version >= "1.2", os.environ["TPM2OPENSSL_TCTI"] == {swtpm.tcti!r})
        try:
            load_tpm2_provider({str(old)!r}, tcti={swtpm.tcti!r})
        except ProviderError as e:
            print(e)
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["0 inherited", "True True"]
    assert lines[2].startswith(f"the tpm2 provider {provider_path()} is already loaded for TCTI")


def test_default_provider_path_is_in_the_system_modules_directory() -> None:
    """`tpm.openssl_provider = ""` means OpenSSL's modules directory. The ctypes call asked for
    OPENSSL_INFO_DIR_FILENAME_SEPARATOR (1005, "/") instead of OPENSSL_INFO_MODULES_DIR (1003),
    so the default looked for /tpm2.so."""
    from hal.openssl_provider import default_provider_path

    result = subprocess.run(
        ["openssl", "version", "-m"], capture_output=True, text=True, check=True
    )  # MODULESDIR: "/usr/lib/x86_64-linux-gnu/ossl-modules"
    modules_dir = result.stdout.split('"')[1]
    assert default_provider_path() == f"{modules_dir}/tpm2.so"


@pytest.mark.parametrize(
    ("min_version", "max_version", "message"),
    [
        ("1.3", "1.2", "TLS maximum version 1.2 is below the minimum 1.3"),
        ("1.2", "1.1", "TLS maximum version must be 1.2 or 1.3, not '1.1'"),
        ("1.0", None, "TLS minimum version must be 1.2 or 1.3, not '1.0'"),
    ],
)
def test_impossible_version_range_is_a_config_error(
    pki: tuple[TestCA, Path, Path, Path], min_version: str, max_version: str | None, message: str
) -> None:
    """Used to be a KeyError, or a context that fails every handshake with 'no protocols'."""
    from agent.tls import insecure_unverified_context

    _, ca_file, _, _ = pki
    with pytest.raises(ConfigError, match=re.escape(message)):
        client_context(ca_file=ca_file, min_version=min_version, max_version=max_version)
    with pytest.raises(ConfigError, match=re.escape(message)):
        insecure_unverified_context(peer="x", min_version=min_version, max_version=max_version)
