"""The vendor side: hash an image, sign a manifest, write a bundle."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from agent.errors import FirmwareVerificationError, StorageError
from agent.firmware import sigalg
from agent.firmware.bundle import SignatureBlock, encode_header
from agent.firmware.manifest import HASH_ALGORITHMS, Manifest
from agent.firmware.pem import load_certificates

BUFFER_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Signer:
    key: PrivateKeyTypes
    #: the signer certificate, then the intermediates a device needs to reach its anchor
    certs: tuple[x509.Certificate, ...]

    @classmethod
    def from_files(
        cls, key: Path, cert: Path, chain: Path | None = None, *, password: bytes | None = None
    ) -> Signer:
        try:
            data = key.read_bytes()
        except OSError as e:
            raise StorageError(f"cannot read the signing key {key}: {e.strerror}") from e
        try:
            private = serialization.load_pem_private_key(data, password=password)
        except (ValueError, TypeError) as e:
            raise FirmwareVerificationError(f"{key}: cannot load the signing key: {e}") from e
        certs = load_certificates(cert)[:1]
        if private.public_key() != certs[0].public_key():
            # Caught here, not by every device that would refuse the bundle later.
            raise FirmwareVerificationError(f"{key} is not the key of the certificate in {cert}")
        if chain is not None:
            certs += load_certificates(chain)
        return cls(key=private, certs=tuple(certs))


def hash_file(path: Path, algorithm: str) -> tuple[int, bytes]:
    digest = hashlib.new(algorithm)
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(BUFFER_BYTES):
                digest.update(chunk)
                size += len(chunk)
    except OSError as e:
        raise StorageError(f"cannot read image {path}: {e.strerror}") from e
    return size, digest.digest()


def make_manifest(
    image: Path,
    *,
    compatible: str,
    version: str,
    security_version: int,
    created: datetime,
    hash_algorithm: str = "sha256",
) -> Manifest:
    if hash_algorithm not in HASH_ALGORITHMS:
        raise FirmwareVerificationError(f"hash algorithm must be one of {sorted(HASH_ALGORITHMS)}")
    size, digest = hash_file(image, hash_algorithm)
    return Manifest(
        compatible=compatible,
        version=version,
        security_version=security_version,
        created=created.replace(microsecond=0),
        payload_size=size,
        hash_algorithm=hash_algorithm,
        digest=digest,
    )


def signed_header(manifest: Manifest, signers: Sequence[Signer]) -> bytes:
    data = manifest.to_bytes()
    blocks = []
    for signer in signers:
        certs = tuple(c.public_bytes(serialization.Encoding.DER) for c in signer.certs)
        blocks.append(SignatureBlock(certs=certs, signature=sigalg.sign(signer.key, data, certs)))
    return encode_header(data, blocks)


def write_bundle(image: Path, out: BinaryIO, manifest: Manifest, signers: Sequence[Signer]) -> None:
    """Write header then the image; the image must still be what `manifest` describes."""
    out.write(signed_header(manifest, signers))
    digest = manifest.new_hash()
    size = 0
    with open(image, "rb") as f:
        while chunk := f.read(BUFFER_BYTES):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    if size != manifest.payload_size or digest.digest() != manifest.digest:
        raise FirmwareVerificationError(f"{image} changed while the bundle was being written")
