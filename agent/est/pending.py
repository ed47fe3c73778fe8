"""A request the EST server answered with 202 Accepted, kept across restarts (0600 JSON file).

It holds the key blob (a TPM-wrapped key, or the software key the identity would hold anyway)
and the exact CSR, so a later attempt resubmits the same request instead of starting over, and
`retry_at`, so a restarted agent does not contact the server before the server said to.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.errors import StorageError
from hal.storage import atomic_write, ensure_private_dir, fsync_dir, read_bytes

FORMAT = 1
OPERATIONS = ("simpleenroll", "simplereenroll")
#: a TPM key blob and a CSR in base64 are a few KiB; anything much larger is not ours
MAX_FILE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class PendingRequest:
    operation: str  # "simpleenroll" | "simplereenroll"
    key_store: str  # KeyStore.kind that made key_blob
    key_blob: bytes
    reused_key: bool  # renew --reuse-key: key_blob is the current identity's key
    csr_der: bytes
    proof_of_possession: bool
    created: datetime
    retry_at: datetime
    attempts: int

    def to_json(self) -> bytes:
        import base64
        import json

        return json.dumps(
            {
                "format": FORMAT,
                "operation": self.operation,
                "key_store": self.key_store,
                "key_blob": base64.b64encode(self.key_blob).decode(),
                "reused_key": self.reused_key,
                "csr": base64.b64encode(self.csr_der).decode(),
                "proof_of_possession": self.proof_of_possession,
                "created": self.created.isoformat(),
                "retry_at": self.retry_at.isoformat(),
                "attempts": self.attempts,
            },
            indent=1,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes, *, source: Path) -> PendingRequest:
        import base64  # here: `status` without a pending request reads no JSON
        import json

        try:
            raw: Any = json.loads(data)
            if not isinstance(raw, dict):
                raise ValueError(f"a JSON {type(raw).__name__}, not an object")
            if raw.get("format") != FORMAT:
                raise ValueError(f"unknown format {raw.get('format')!r}")
            if raw["operation"] not in OPERATIONS:
                raise ValueError(f"unknown operation {raw['operation']!r}")
            request = cls(
                operation=str(raw["operation"]),
                key_store=str(raw["key_store"]),
                key_blob=base64.b64decode(raw["key_blob"], validate=True),
                reused_key=bool(raw["reused_key"]),
                csr_der=base64.b64decode(raw["csr"], validate=True),
                proof_of_possession=bool(raw["proof_of_possession"]),
                created=datetime.fromisoformat(raw["created"]),
                retry_at=datetime.fromisoformat(raw["retry_at"]),
                attempts=int(raw["attempts"]),
            )
        # OverflowError: "attempts": 1e999; RecursionError: [[[[...]]]] nested too deep
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
            raise StorageError(
                f"{source}: unreadable pending EST request ({e}); delete it to start over"
            ) from e
        if request.retry_at.tzinfo is None or request.created.tzinfo is None:
            raise StorageError(f"{source}: pending EST request has times without a zone")
        return request


class PendingStore:
    def __init__(self, *, path: Path, group: int | None = None) -> None:
        self.path = path
        #: `paths.identity_group`'s gid: its directory may stay shared with it (hal.secure_dir)
        self.group = group

    def load(self) -> PendingRequest | None:
        try:
            data = read_bytes(self.path, limit=MAX_FILE_BYTES)
        except StorageError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                return None
            raise
        return PendingRequest.from_json(data, source=self.path)

    def save(self, request: PendingRequest) -> None:
        ensure_private_dir(self.path.parent, group=self.group)
        atomic_write(self.path, request.to_json())

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
            fsync_dir(self.path.parent)
