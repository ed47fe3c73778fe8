"""The signed manifest: what a bundle claims, as canonical JSON bytes.

The signatures cover these exact bytes. There is one byte string per manifest: before
parsing, the nesting depth is bounded by a scan of the bytes (a 3000-deep array must not reach
the recursive JSON parser); after parsing, every field has its exact JSON type (a boolean or a
float is not an integer), `created` has exactly the form `YYYY-MM-DDTHH:MM:SSZ`, and the
manifest re-encoded from the parsed fields (`Manifest.to_bytes`) must equal the input. So no
whitespace, key-order, escaping, number-spelling or timestamp variants, no duplicate keys, no
unknown keys.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from agent.bounded_json import too_deep
from agent.errors import FirmwareVerificationError

MANIFEST_FORMAT = 1
HASH_ALGORITHMS = {"sha256": 32, "sha384": 48}
MAX_SECURITY_VERSION = 65535  # raising a TPM counter is one command per step: keep steps small
MAX_STRING_CHARS = 256
_KEYS = {"compatible", "created", "format", "payload", "security_version", "version"}
_PAYLOAD_KEYS = {"digest", "hash_algorithm", "size"}
_PRINTABLE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?\Z")
_CREATED = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z\Z")
#: the manifest is an object holding one object ("payload"): nothing deeper is ever valid
MAX_DEPTH = 2
MAX_MANIFEST_BYTES = 16 * 1024


@dataclass(frozen=True)
class Manifest:
    compatible: str
    version: str
    security_version: int
    created: datetime
    payload_size: int
    hash_algorithm: str  # "sha256" or "sha384"
    digest: bytes

    def to_bytes(self) -> bytes:
        return canonical_json(
            {
                "format": MANIFEST_FORMAT,
                "compatible": self.compatible,
                "version": self.version,
                "security_version": self.security_version,
                "created": self.created.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "payload": {
                    "size": self.payload_size,
                    "hash_algorithm": self.hash_algorithm,
                    "digest": self.digest.hex(),
                },
            }
        )

    def new_hash(self) -> hashlib._Hash:
        return hashlib.new(self.hash_algorithm)


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _check_depth(data: bytes) -> None:
    """Refuse nesting deeper than MAX_DEPTH by scanning the bytes (strings skipped), before the
    JSON parser, which recurses once per level, ever sees them."""
    if too_deep(data, MAX_DEPTH):
        raise _fail(f"nested deeper than {MAX_DEPTH} levels")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def _fail(message: str) -> FirmwareVerificationError:
    return FirmwareVerificationError(f"manifest: {message}")


def _string(table: dict[str, Any], key: str) -> str:
    value = table[key]
    if not isinstance(value, str) or not _PRINTABLE.match(value) or len(value) > MAX_STRING_CHARS:
        raise _fail(f"{key} must be 1-{MAX_STRING_CHARS} printable ASCII characters")
    return value


def _integer(table: dict[str, Any], key: str, maximum: int, label: str = "") -> int:
    value = table[key]
    if type(value) is not int or not 0 <= value <= maximum:  # bool and float are not int
        raise _fail(f"{label or key} must be an integer from 0 to {maximum}")
    return value


def _payload_size(payload: dict[str, Any], maximum: int) -> int:
    # An empty image would be "installed" without writing a byte and then booted: whatever
    # the slot held before (an older image, a half-written one) would run as the new version.
    size = _integer(payload, "size", maximum, "payload.size")
    if size == 0:
        raise _fail("payload.size is 0: an empty image cannot be installed")
    return size


def parse_manifest(data: bytes, *, max_payload_bytes: int) -> Manifest:
    """Parse and validate manifest bytes; raise FirmwareVerificationError naming the field."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise _fail(f"{len(data)} bytes is more than {MAX_MANIFEST_BYTES}")
    _check_depth(data)
    try:
        table = json.loads(data.decode("ascii"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(f"not canonical JSON ({e})") from e
    if not isinstance(table, dict):
        raise _fail("not a JSON object")
    if canonical_json(table) != data:
        raise _fail("not in canonical form (sorted keys, no whitespace, ASCII escapes)")
    if type(table.get("format")) is not int or table.get("format") != MANIFEST_FORMAT:
        raise _fail(f"format {table.get('format')!r} is not supported (expected 1)")
    if set(table) != _KEYS:
        raise _fail(f"expected keys {sorted(_KEYS)}, got {sorted(table)}")
    payload = table["payload"]
    if not isinstance(payload, dict) or set(payload) != _PAYLOAD_KEYS:
        raise _fail(f"payload must be an object with keys {sorted(_PAYLOAD_KEYS)}")
    algorithm = payload["hash_algorithm"]
    if not isinstance(algorithm, str) or algorithm not in HASH_ALGORITHMS:
        raise _fail(f"payload.hash_algorithm must be one of {sorted(HASH_ALGORITHMS)}")
    digest_hex = payload["digest"]
    if not isinstance(digest_hex, str) or not re.fullmatch(
        f"[0-9a-f]{{{2 * HASH_ALGORITHMS[algorithm]}}}", digest_hex
    ):
        raise _fail(f"payload.digest must be {HASH_ALGORITHMS[algorithm]} bytes of lowercase hex")
    created_text = _string(table, "created")
    if not _CREATED.match(created_text):
        raise _fail("created must be a UTC time exactly like 2026-01-31T12:00:00Z")
    try:
        created = datetime.strptime(created_text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError as e:
        raise _fail("created must be a UTC time like 2026-01-31T12:00:00Z") from e
    manifest = Manifest(
        compatible=_string(table, "compatible"),
        version=_string(table, "version"),
        security_version=_integer(table, "security_version", MAX_SECURITY_VERSION),
        created=created,
        payload_size=_payload_size(payload, max_payload_bytes),
        hash_algorithm=algorithm,
        digest=bytes.fromhex(digest_hex),
    )
    if manifest.to_bytes() != data:  # one encoding: what we believe is exactly what was signed
        raise _fail("does not re-encode to the same bytes (one encoding per manifest)")
    return manifest
