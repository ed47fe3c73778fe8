"""Certificates and CRLs from PEM (or DER) files, with one-line errors naming the file."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from agent.errors import ConfigError
from agent.firmware.chain import NamedCrl
from hal.storage import read_bytes

MAX_PEM_BYTES = 4 * 1024 * 1024


def load_certificates(path: Path) -> list[x509.Certificate]:
    """Every certificate in a PEM file (at least one)."""
    data = _read(path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except (ValueError, x509.InvalidVersion) as e:  # InvalidVersion is not a ValueError
        raise ConfigError(f"{path}: no valid PEM certificates: {e}") from e
    return certs


def load_crl(path: Path) -> NamedCrl:
    data = _read(path)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            crl = x509.load_pem_x509_crl(data)
        else:
            crl = x509.load_der_x509_crl(data)
    except ValueError as e:
        raise ConfigError(f"{path}: not a valid CRL: {e}") from e
    return NamedCrl(source=str(path), crl=crl)


def _read(path: Path) -> bytes:
    try:
        return read_bytes(path, limit=MAX_PEM_BYTES)
    except Exception as e:
        raise ConfigError(str(e)) from e
