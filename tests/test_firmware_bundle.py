"""Bundle format: parsing is bounded, the manifest is canonical, every changed byte is refused."""

from __future__ import annotations

import datetime as dt
import io
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import FirmwareVerificationError, TrustError
from agent.firmware.bundle import MAGIC, BundleLimits, encode_header, read_header
from agent.firmware.chain import TrustPolicy
from agent.firmware.manifest import canonical_json, parse_manifest
from agent.firmware.verify import DeviceFacts, stream_payload, verify_header
from tests.support.firmware import COMPATIBLE, Vendor, image, make_bundle, manifest_for

NOW = dt.datetime.now(dt.timezone.utc)
VENDOR = Vendor()
POLICY = TrustPolicy(anchors=(VENDOR.root.cert,))
DEVICE = DeviceFacts(compatible=COMPATIBLE, committed_security_version=0)
PAYLOAD = image(2048)
BUNDLE = make_bundle(PAYLOAD, [VENDOR.signer])


def verify_bytes(data: bytes, device: DeviceFacts = DEVICE) -> None:
    stream = io.BytesIO(data)
    header = read_header(stream)
    manifest = verify_header(header, policy=POLICY, device=device, now=NOW)
    stream_payload(stream, manifest, buffer_bytes=512)


def test_round_trip() -> None:
    verify_bytes(BUNDLE)
    header = read_header(io.BytesIO(BUNDLE))
    assert header.manifest.payload_size == len(PAYLOAD)
    assert BUNDLE[header.payload_offset :] == PAYLOAD


@pytest.mark.parametrize("algorithm", ["sha256", "sha384"])
def test_hash_algorithms(algorithm: str) -> None:
    verify_bytes(make_bundle(PAYLOAD, [VENDOR.signer], hash_algorithm=algorithm))


def test_empty_payload_is_refused() -> None:
    # Found in review: an empty payload verified, and install then set an unwritten slot
    # (whatever it held before) as the next boot.
    with pytest.raises(FirmwareVerificationError, match=r"payload\.size is 0"):
        verify_bytes(make_bundle(b"", [VENDOR.signer]))


def test_truncated_payload() -> None:
    with pytest.raises(FirmwareVerificationError, match="payload is truncated: 2047 of 2048"):
        verify_bytes(BUNDLE[:-1])


def test_over_long_payload() -> None:
    with pytest.raises(FirmwareVerificationError, match="payload is longer than the 2048 bytes"):
        verify_bytes(BUNDLE + b"\0")


def test_unsigned_bundle() -> None:
    manifest = manifest_for(PAYLOAD).to_bytes()
    data = encode_header(manifest, []) + PAYLOAD
    with pytest.raises(FirmwareVerificationError, match=r"signature count 0 is outside 1\.\.4"):
        verify_bytes(data)


def test_not_a_bundle() -> None:
    with pytest.raises(FirmwareVerificationError, match="bad magic"):
        verify_bytes(b"hello world, this is not a bundle")
    with pytest.raises(FirmwareVerificationError, match="truncated in the prelude"):
        verify_bytes(MAGIC)


class CountingStream(io.BytesIO):
    """Records the largest read the parser asks for."""

    largest = 0

    def read(self, size: int | None = -1) -> bytes:
        self.largest = max(self.largest, size if size is not None and size >= 0 else 1 << 62)
        return super().read(size)


@pytest.mark.parametrize("header_len", [0, 256 * 1024 + 1, 0xFFFFFFFF])
def test_header_length_is_bounded(header_len: int) -> None:
    stream = CountingStream(struct.pack(">8sHI", MAGIC, 1, header_len) + b"x" * 100)
    with pytest.raises(FirmwareVerificationError, match="header length"):
        read_header(stream)
    assert stream.largest <= 14


def test_inner_lengths_are_bounded() -> None:
    limits = BundleLimits()
    # manifest length field claims 4 GiB inside a small header
    header = (0xFFFFFFFF).to_bytes(4, "big") + b"{}"
    data = struct.pack(">8sHI", MAGIC, 1, len(header)) + header
    stream = CountingStream(data)
    with pytest.raises(FirmwareVerificationError, match=r"manifest length 4294967295 is outside"):
        read_header(stream, limits)
    assert stream.largest <= max(14, len(header))


def test_declared_payload_size_is_bounded() -> None:
    manifest = manifest_for(PAYLOAD, size=65 * 1024**3)
    data = make_bundle(PAYLOAD, [VENDOR.signer], manifest=manifest)
    with pytest.raises(FirmwareVerificationError, match=r"payload\.size must be an integer"):
        read_header(io.BytesIO(data))


def test_trailing_bytes_in_header() -> None:
    header = read_header(io.BytesIO(BUNDLE))
    raw = encode_header(header.manifest_bytes, list(header.signatures))
    bad = struct.pack(">8sHI", MAGIC, 1, len(raw) - 14 + 1) + raw[14:] + b"\0"
    with pytest.raises(FirmwareVerificationError, match="1 unexpected bytes at the end"):
        read_header(io.BytesIO(bad + PAYLOAD))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: {**d, "extra": 1},
        lambda d: {k: v for k, v in d.items() if k != "version"},
        lambda d: {**d, "security_version": -1},
        lambda d: {**d, "security_version": True},
        lambda d: {**d, "format": 2},
        lambda d: {**d, "compatible": "bad\nname"},
        lambda d: {**d, "created": "yesterday"},
        lambda d: {**d, "payload": {**d["payload"], "hash_algorithm": "md5"}},
        lambda d: {**d, "payload": {**d["payload"], "digest": "AB" * 32}},
    ],
)
def test_manifest_fields_are_validated(mutate: object) -> None:
    import json

    table = json.loads(manifest_for(PAYLOAD).to_bytes())
    data = canonical_json(mutate(table))  # type: ignore[operator]
    with pytest.raises(FirmwareVerificationError, match=r"^manifest: "):
        parse_manifest(data, max_payload_bytes=1 << 40)


def test_manifest_must_be_canonical() -> None:
    data = manifest_for(PAYLOAD).to_bytes()
    spaced = data.replace(b",", b", ")
    with pytest.raises(FirmwareVerificationError, match="not in canonical form"):
        parse_manifest(spaced, max_payload_bytes=1 << 40)
    duplicated = data[:-1] + b',"version":"9"}'
    with pytest.raises(FirmwareVerificationError, match="duplicate key"):
        parse_manifest(duplicated, max_payload_bytes=1 << 40)


@settings(
    max_examples=int(os.environ.get("FIRMWARE_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.data())
def test_any_flipped_bit_is_rejected(data: st.DataObject) -> None:
    """Flip 1-3 random bits anywhere: prelude, manifest, signatures, certificates, payload."""
    header_end = read_header(io.BytesIO(BUNDLE)).payload_offset
    region = data.draw(st.sampled_from(["header", "payload", "anywhere"]))
    low, high = {
        "header": (0, header_end),
        "payload": (header_end, len(BUNDLE)),
        "anywhere": (0, len(BUNDLE)),
    }[region]
    flips = data.draw(
        st.lists(st.integers(low * 8, high * 8 - 1), min_size=1, max_size=3, unique=True)
    )
    mutated = bytearray(BUNDLE)
    for bit in flips:
        mutated[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(TrustError):
        verify_bytes(bytes(mutated))


def test_every_single_byte_of_the_header_matters() -> None:
    """Exhaustive over the header: flip every bit once; all rejected. (This found that X.509
    leaves the signature BIT STRING's padding count outside a certificate's own signature;
    signatures now bind the certificate bytes.)"""
    header_end = read_header(io.BytesIO(BUNDLE)).payload_offset
    for i in range(header_end):
        for bit in range(8):
            mutated = bytearray(BUNDLE)
            mutated[i] ^= 1 << bit
            with pytest.raises(TrustError):
                verify_bytes(bytes(mutated))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 400))
def test_garbage_headers_fail_cleanly(tail: bytes, cut: int) -> None:
    """Random bytes after a valid prelude, or any prefix of a real bundle: a one-line
    TrustError, never another exception."""
    header_len = len(tail)
    for data in (struct.pack(">8sHI", MAGIC, 1, max(header_len, 1)) + tail, BUNDLE[:cut]):
        with pytest.raises(TrustError):
            verify_bytes(data)
