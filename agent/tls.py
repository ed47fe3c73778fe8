"""TLS client contexts for the device identity: TLS >= 1.2, explicit CA file, hostname checks on.

A TPM key file (`TSS2 PRIVATE KEY`) is signed with through the tpm2 OpenSSL provider, which must
have been loaded into this process first (hal.openssl_provider.load_tpm2_provider, done by
agent.wiring). Each live context with a TPM key holds one TPM object slot: keep few alive.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from agent.errors import ConfigError, ProviderError
from hal.openssl_provider import loaded_provider, object_slot_shortage

log = logging.getLogger(__name__)

TSS2_PEM_MARKER = b"-----BEGIN TSS2 PRIVATE KEY-----"

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def is_tpm_key_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return TSS2_PEM_MARKER in f.read(4096)
    except OSError:
        return False


def client_context(
    *,
    ca_file: Path,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    min_version: str = "1.2",
    max_version: str | None = None,
) -> ssl.SSLContext:
    """A client context that verifies the server against `ca_file` only (no system store).

    With `cert_file` and `key_file` it presents that client identity (mutual TLS).
    """
    _check_versions(min_version, max_version)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED are on
    ctx.minimum_version = _VERSIONS[min_version]
    if max_version is not None:
        ctx.maximum_version = _VERSIONS[max_version]
    # RFC 5280 as private PKIs use it, the same on every Python: whatever the anchor file
    # holds is an anchor (an intermediate too), and no X509_STRICT, which Python 3.13 turns on
    # and which refuses a CA with a non-critical basicConstraints or without key identifiers
    ctx.verify_flags = (ctx.verify_flags | ssl.VERIFY_X509_PARTIAL_CHAIN) & ~ssl.VERIFY_X509_STRICT
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load trust anchor file {ca_file}: {e}") from e
    if cert_file is not None and key_file is not None:
        load_client_identity(ctx, cert_file, key_file)
    return ctx


def _check_versions(min_version: str, max_version: str | None) -> None:
    """A context that can never handshake fails here, in one line, not at connect time."""
    if min_version not in _VERSIONS:
        raise ConfigError(f"TLS minimum version must be 1.2 or 1.3, not {min_version!r}")
    if max_version is not None:
        if max_version not in _VERSIONS:
            raise ConfigError(f"TLS maximum version must be 1.2 or 1.3, not {max_version!r}")
        if _VERSIONS[max_version] < _VERSIONS[min_version]:
            raise ConfigError(
                f"TLS maximum version {max_version} is below the minimum {min_version} "
                "(tls.min_version): no protocol version is left to connect with"
            )


def insecure_unverified_context(
    *, peer: str, min_version: str = "1.2", max_version: str | None = None
) -> ssl.SSLContext:
    """A context that does NOT authenticate the server. Only for RFC 7030 4.1.1 bootstrap, whose
    caller accepts what it fetches only if it matches a configured fingerprint. Warns each time."""
    log.warning("TLS to %s without verifying the server (bootstrap; never send secrets)", peer)
    _check_versions(min_version, max_version)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = _VERSIONS[min_version]
    if max_version is not None:
        ctx.maximum_version = _VERSIONS[max_version]
    return ctx


def load_client_identity(ctx: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    """Attach a certificate and its key (file key or TPM key) to `ctx`."""
    if is_tpm_key_file(key_file) and loaded_provider() is None:
        raise ProviderError(
            f"{key_file} is a TPM key, but the tpm2 OpenSSL provider is not loaded into this "
            "process; TPM-backed TLS needs it (see tpm.openssl_provider)"
        )
    try:
        ctx.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    except (OSError, ssl.SSLError) as e:
        message = f"cannot use client identity {cert_file} with key {key_file}: {e}"
        if is_tpm_key_file(key_file):
            raise ProviderError(message + object_slot_shortage()) from e
        raise ConfigError(message) from e
