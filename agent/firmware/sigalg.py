"""The signature schemes a bundle may carry, chosen by the signer certificate's key type.

ECDSA P-256 (SHA-256), ECDSA P-384 (SHA-384), Ed25519, RSA-PSS >= 2048 bits (SHA-256, MGF1
SHA-256, salt length 32). The signed bytes are

    context string | SHA-256 of the block's certificates (each u32 length | DER) | manifest

The context string keeps a code-signing key's signature from being replayed as anything else.
The certificate digest binds the exact certificate bytes to the signature: X.509 leaves some
bytes of a certificate outside its own signature (the outer signature's BIT STRING padding
count, for one), and a bundle must have no byte that can change without being refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from agent.errors import FirmwareVerificationError

CONTEXT = b"devid-agent firmware manifest v1\x00"
MIN_RSA_BITS = 2048
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


def describe(key: PublicKeyTypes) -> str | None:
    """The scheme for `key`, or None if bundles may not be signed with such a key."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ecdsa-p256-sha256", "secp384r1": "ecdsa-p384-sha384"}.get(
            key.curve.name
        )
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA_BITS:
        return f"rsa{key.key_size}-pss-sha256"
    return None


def signed_bytes(manifest: bytes, certs: Sequence[bytes]) -> bytes:
    bound = hashlib.sha256(b"".join(len(c).to_bytes(4, "big") + c for c in certs)).digest()
    return CONTEXT + bound + manifest


def sign(key: PrivateKeyTypes, manifest: bytes, certs: Sequence[bytes]) -> bytes:
    data = signed_bytes(manifest, certs)
    if describe(key.public_key()) is None:
        raise FirmwareVerificationError(
            "signing key must be ECDSA P-256/P-384, Ed25519 or RSA >= 2048 bits"
        )
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm = hashes.SHA384() if key.curve.key_size == 384 else hashes.SHA256()
        return key.sign(data, ec.ECDSA(algorithm))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, _PSS, hashes.SHA256())
    raise AssertionError("unreachable: describe() accepted the key")


def verify(key: PublicKeyTypes, signature: bytes, manifest: bytes, certs: Sequence[bytes]) -> bool:
    """True if `signature` is `key`'s signature over `manifest` and `certs` (DER) in the scheme
    for its type."""
    data = signed_bytes(manifest, certs)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            algorithm = hashes.SHA384() if key.curve.key_size == 384 else hashes.SHA256()
            key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, _PSS, hashes.SHA256())
        else:
            return False
    except InvalidSignature:
        return False
    return True
