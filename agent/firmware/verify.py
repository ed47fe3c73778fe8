"""Bundle verification: pure checks over the parsed header and `now`, and a streaming payload
check over any binary stream.

Every signature in the bundle must verify and chain to a trust anchor (a bundle whose second
signature is garbage is rejected, not accepted on the first: no byte of a bundle is unchecked).
Signer policy (TUF's threshold): at least `policy.required_signers` distinct signer keys must
sign; two blocks by the same key count once, so they are refused as a duplicate.
Only then are the manifest's claims (compatible, security_version) believed.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, BinaryIO

from agent.errors import ChainValidationError, FirmwareVerificationError, RollbackError
from agent.firmware.bundle import BundleHeader, read_some
from agent.firmware.manifest import Manifest

if TYPE_CHECKING:
    from agent.firmware.chain import TrustPolicy

log = logging.getLogger(__name__)

DEFAULT_BUFFER_BYTES = 1024 * 1024


@dataclass(frozen=True)
class DeviceFacts:
    """What the device is and has committed: the manifest is judged against these."""

    compatible: str
    committed_security_version: int


def verify_header(
    header: BundleHeader, *, policy: TrustPolicy, device: DeviceFacts, now: datetime
) -> Manifest:
    """Check signatures, signer chains, the signer threshold, compatibility and anti-rollback;
    return the manifest."""
    # cryptography is imported here, not at the top: status, commit and rollback use this
    # module's streaming half and start without it (a firmware command runs once per boot).
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from agent.firmware import sigalg
    from agent.firmware.chain import verify_signer

    keys: dict[bytes, int] = {}
    for i, block in enumerate(header.signatures):
        try:
            certs = [x509.load_der_x509_certificate(der) for der in block.certs]
            key = certs[0].public_key()
        except Exception as e:  # any parse failure of these untrusted bytes is a rejection
            raise ChainValidationError(f"signature {i}: malformed certificate: {e}") from e
        scheme = sigalg.describe(key)
        if scheme is None:
            raise FirmwareVerificationError(
                f"signature {i}: signer key type is not allowed "
                "(ECDSA P-256/P-384, Ed25519 or RSA >= 2048 bits)"
            )
        if not sigalg.verify(key, block.signature, header.manifest_bytes, block.certs):
            raise FirmwareVerificationError(
                f"signature {i} ({scheme}) does not verify over the manifest"
            )
        try:
            chain = verify_signer(certs, policy, now)
        except ChainValidationError as e:
            raise ChainValidationError(f"signature {i}: {e}") from e
        spki = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if spki in keys:
            raise FirmwareVerificationError(
                f"signature {i} is by the same key as signature {keys[spki]} (a signer counts once)"
            )
        keys[spki] = i
        log.debug("signature %d (%s) by %s", i, scheme, chain[0].subject.rfc4514_string())
    if len(keys) < policy.required_signers:
        raise FirmwareVerificationError(
            f"bundle is signed by {len(keys)} distinct signer key(s); "
            f"firmware.required_signers is {policy.required_signers}"
        )
    manifest = header.manifest
    if manifest.compatible != device.compatible:
        raise FirmwareVerificationError(
            f"bundle is for {manifest.compatible!r}, this device is {device.compatible!r}"
        )
    if manifest.security_version < device.committed_security_version:
        raise RollbackError(
            f"bundle security_version {manifest.security_version} is below the committed "
            f"security version {device.committed_security_version} (downgrade refused)"
        )
    return manifest


def stream_payload(
    stream: BinaryIO,
    manifest: Manifest,
    *,
    sink: Callable[[memoryview], object] | None = None,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> None:
    """Read exactly the manifest's payload size from `stream` with a bounded buffer, passing
    each chunk to `sink`; then require end of stream and the manifest's digest."""
    digest = manifest.new_hash()
    remaining = manifest.payload_size
    buffer = bytearray(min(buffer_bytes, max(remaining, 1)))
    view = memoryview(buffer)
    while remaining:
        want = min(remaining, len(buffer))
        got = read_some(stream, view[:want])
        if not got:
            raise FirmwareVerificationError(
                f"payload is truncated: {manifest.payload_size - remaining} of "
                f"{manifest.payload_size} bytes"
            )
        chunk = view[:got]
        digest.update(chunk)
        if sink is not None:
            sink(chunk)
        remaining -= got
    if read_some(stream, memoryview(bytearray(1))):
        raise FirmwareVerificationError(
            f"payload is longer than the {manifest.payload_size} bytes the manifest states"
        )
    if not hmac.compare_digest(digest.digest(), manifest.digest):
        raise FirmwareVerificationError(
            f"payload {manifest.hash_algorithm} does not match the manifest"
        )
