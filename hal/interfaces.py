"""The seams between agent/ (decisions, protocols) and hal/ (hardware, disk).

agent/ sees hardware only through these Protocols; implementations are picked in agent/wiring.py.
"""

from __future__ import annotations

import enum
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PublicKeyTypes,
)


class KeyAlgorithm(enum.Enum):
    """Key types the agent can create. ECC P-256 is the default: ~2 ms on a TPM, RSA up to 1 s."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"

    @property
    def is_rsa(self) -> bool:
        return self in (KeyAlgorithm.RSA_2048, KeyAlgorithm.RSA_3072)


@runtime_checkable
class KeyStore(Protocol):
    """Creates signing keys and signs with them; private keys never leave the store in the clear.

    A key is identified by its *blob*: the bytes stored on disk (a `TSS2 PRIVATE KEY` PEM that only
    this TPM can load, or a PKCS#8 PEM for software keys).
    """

    #: "tpm" or "software"; shown wherever the key store is reported.
    kind: str
    #: False for software keys: the private key is a file an attacker with root can copy.
    hardware_backed: bool
    #: the file name the key is stored under in an identity generation ("key.tss2.pem", "key.pem")
    key_file_name: str

    def generate(self, algorithm: KeyAlgorithm) -> bytes:
        """Create a new key and return its blob."""
        ...

    def signer(self, blob: bytes) -> AbstractContextManager[CertificateIssuerPrivateKeyTypes]:
        """Load the key for signing; it is unloaded (TPM context flushed) when the block ends."""
        ...

    def public_key(self, blob: bytes) -> PublicKeyTypes:
        """The key's public half."""
        ...


@runtime_checkable
class MonotonicCounter(Protocol):
    """A counter that can only go up (anti-rollback security version)."""

    kind: str
    hardware_backed: bool

    def read(self) -> int: ...

    def raise_to(self, value: int) -> int:
        """Raise the counter to at least `value`; never lowers it. Returns the new value."""
        ...
