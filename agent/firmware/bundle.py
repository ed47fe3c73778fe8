"""The bundle container (format 1): a bounded header, then the payload, streamed.

    magic "\\x89DEVIDFW" | u16 format=1 | u32 header_len | header | payload (manifest's size)

    header = u32 manifest_len | manifest
             u8 signature_count
             signature_count x ( u8 cert_count | cert_count x (u32 len | DER) | u32 len | sig )

All integers are big-endian. Every length is checked against `BundleLimits` before anything is
read or allocated, and the header is read in one bounded read, so no field can make the parser
read or allocate without limit. The payload comes last so it can be streamed from a pipe.
One encoding per bundle: a signature block or certificate given twice is refused, and the
header re-encoded from what was parsed must equal the bytes read.
docs/firmware-format.md is the full description.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

from agent.errors import FirmwareVerificationError, StorageError
from agent.firmware.manifest import Manifest, parse_manifest

MAGIC = b"\x89DEVIDFW"
FORMAT_VERSION = 1
_PRELUDE = struct.Struct(">8sHI")


@dataclass(frozen=True)
class BundleLimits:
    max_header_bytes: int = 256 * 1024
    max_manifest_bytes: int = 16 * 1024
    max_signatures: int = 4
    max_certs_per_signature: int = 4
    max_cert_bytes: int = 16 * 1024
    max_signature_bytes: int = 1024  # RSA-8192 fits
    max_payload_bytes: int = 64 * 1024**3


DEFAULT_LIMITS = BundleLimits()


@dataclass(frozen=True)
class SignatureBlock:
    #: DER certificates: the signer first, then the intermediates it needs
    certs: tuple[bytes, ...]
    signature: bytes


@dataclass(frozen=True)
class BundleHeader:
    manifest_bytes: bytes
    manifest: Manifest
    signatures: tuple[SignatureBlock, ...]
    #: bytes before the payload (prelude + header)
    payload_offset: int


def _fail(message: str) -> FirmwareVerificationError:
    return FirmwareVerificationError(f"bundle: {message}")


def read_some(stream: BinaryIO, into: memoryview) -> int:
    """Read up to len(into) bundle bytes; 0 at the end. An I/O error on the bundle (EIO from a
    disk, a broken pipe) is a StorageError naming the bundle, never a bare OSError, and never
    mistaken for an error of the slot being written at the same time."""
    try:
        return stream.readinto(into) or 0  # type: ignore[attr-defined]
    except OSError as e:
        raise StorageError(f"cannot read the bundle: {e.strerror or e}") from e


def _read_exact(stream: BinaryIO, size: int, what: str) -> bytes:
    data = bytearray(size)
    view = memoryview(data)
    done = 0
    while done < size:
        got = read_some(stream, view[done:])
        if not got:
            raise _fail(f"truncated in the {what} ({done} of {size} bytes)")
        done += got
    return bytes(data)


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int, what: str) -> bytes:
        if size > len(self.data) - self.pos:
            raise _fail(f"header ends inside the {what}")
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out

    def u8(self, what: str) -> int:
        return int(self.take(1, what)[0])

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "big")

    def sized(self, what: str, limit: int) -> bytes:
        size = self.u32(f"{what} length")
        if not 0 < size <= limit:
            raise _fail(f"{what} length {size} is outside 1..{limit}")
        return self.take(size, what)


def read_header(stream: BinaryIO, limits: BundleLimits = DEFAULT_LIMITS) -> BundleHeader:
    """Read and parse the header; leaves `stream` at the first payload byte."""
    prelude = _read_exact(stream, _PRELUDE.size, "prelude")
    magic, version, header_len = _PRELUDE.unpack(prelude)
    if magic != MAGIC:
        raise _fail("not a devid-agent firmware bundle (bad magic)")
    if version != FORMAT_VERSION:
        raise _fail(f"format version {version} is not supported (expected {FORMAT_VERSION})")
    if not 0 < header_len <= limits.max_header_bytes:
        raise _fail(f"header length {header_len} is outside 1..{limits.max_header_bytes}")
    raw = _read_exact(stream, header_len, "header")
    cursor = _Cursor(raw)
    manifest_bytes = cursor.sized("manifest", limits.max_manifest_bytes)
    count = cursor.u8("signature count")
    if not 0 < count <= limits.max_signatures:
        raise _fail(f"signature count {count} is outside 1..{limits.max_signatures}")
    blocks = []
    for i in range(count):
        cert_count = cursor.u8(f"signature {i} certificate count")
        if not 0 < cert_count <= limits.max_certs_per_signature:
            raise _fail(
                f"signature {i} certificate count {cert_count} is outside "
                f"1..{limits.max_certs_per_signature}"
            )
        certs = tuple(
            cursor.sized(f"signature {i} certificate {j}", limits.max_cert_bytes)
            for j in range(cert_count)
        )
        if len(set(certs)) != len(certs):
            raise _fail(f"signature {i} carries the same certificate twice")
        signature = cursor.sized(f"signature {i}", limits.max_signature_bytes)
        blocks.append(SignatureBlock(certs=certs, signature=signature))
    if cursor.pos != len(cursor.data):
        raise _fail(f"{len(cursor.data) - cursor.pos} unexpected bytes at the end of the header")
    _no_duplicate_blocks(blocks)
    manifest = parse_manifest(manifest_bytes, max_payload_bytes=limits.max_payload_bytes)
    if encode_header(manifest.to_bytes(), blocks) != prelude + raw:
        raise _fail("does not re-encode to the same bytes (one encoding per bundle)")
    return BundleHeader(
        manifest_bytes=manifest_bytes,
        manifest=manifest,
        signatures=tuple(blocks),
        payload_offset=_PRELUDE.size + header_len,
    )


def _no_duplicate_blocks(blocks: list[SignatureBlock]) -> None:
    """The same block, signature or signer certificate twice adds no signer: refuse it, so
    a bundle has one encoding and no signer is counted twice."""
    seen_sig: dict[bytes, int] = {}
    seen_signer: dict[bytes, int] = {}
    for i, block in enumerate(blocks):
        if block.signature in seen_sig:
            raise _fail(f"signature {i} repeats signature {seen_sig[block.signature]}")
        if block.certs[0] in seen_signer:
            raise _fail(
                f"signature {i} is by the same signer certificate as signature "
                f"{seen_signer[block.certs[0]]}"
            )
        seen_sig[block.signature] = i
        seen_signer[block.certs[0]] = i


def encode_header(manifest_bytes: bytes, signatures: list[SignatureBlock]) -> bytes:
    """The prelude and header for a bundle (the vendor side; the payload follows)."""
    parts = [len(manifest_bytes).to_bytes(4, "big"), manifest_bytes, bytes([len(signatures)])]
    for block in signatures:
        parts.append(bytes([len(block.certs)]))
        for cert in block.certs:
            parts += [len(cert).to_bytes(4, "big"), cert]
        parts += [len(block.signature).to_bytes(4, "big"), block.signature]
    header = b"".join(parts)
    return _PRELUDE.pack(MAGIC, FORMAT_VERSION, len(header)) + header
