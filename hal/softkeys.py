"""File keys for devices without a TPM. Weaker: root on the device can copy the private key.

Wherever the key store is reported, this one says `hardware_backed: false`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
    PublicKeyTypes,
)

from hal.errors import KeyStoreError
from hal.interfaces import KeyAlgorithm

log = logging.getLogger(__name__)


def _new_private_key(algorithm: KeyAlgorithm) -> PrivateKeyTypes:
    if algorithm is KeyAlgorithm.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm is KeyAlgorithm.EC_P384:
        return ec.generate_private_key(ec.SECP384R1())
    bits = 2048 if algorithm is KeyAlgorithm.RSA_2048 else 3072
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


class SoftwareKeyStore:
    """A `KeyStore` whose keys are unencrypted PKCS#8 PEM files (stored 0600 by the caller)."""

    kind = "software"
    hardware_backed = False
    key_file_name = "key.pem"

    def generate(self, algorithm: KeyAlgorithm) -> bytes:
        key = _new_private_key(algorithm)
        log.warning("created %s key in software: it is only as safe as the file", algorithm.value)
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def _load(self, blob: bytes) -> CertificateIssuerPrivateKeyTypes:
        try:
            key = serialization.load_pem_private_key(blob, password=None)
        except (ValueError, TypeError) as e:
            raise KeyStoreError(f"not a usable PEM private key: {e}") from e
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise KeyStoreError(f"unsupported software key type {type(key).__name__}")
        return key

    @contextmanager
    def signer(self, blob: bytes) -> Iterator[CertificateIssuerPrivateKeyTypes]:
        yield self._load(blob)

    def public_key(self, blob: bytes) -> PublicKeyTypes:
        return self._load(blob).public_key()
