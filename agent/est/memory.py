"""What the agent remembers about its EST server between runs, to save round trips
(state_dir/est-server.json, 0600).

- `basic`: the server demanded HTTP Basic, so the next request carries the credentials at once
  (still only over a TLS connection whose server certificate was verified);
- which EST CA set (in state_dir/cacerts.pem) came from this server under this anchor, so it
  replaces /cacerts;
- the last /csrattrs answer (or that there was none), with when it was fetched and the EST CA
  set it was fetched under: reused until that set changes or `est.csrattrs_max_age_seconds`
  passes.

Keyed by the server (URL and label) and the SHA-256 of the TLS anchor file: a change of either
forgets everything. A file that cannot be read as one is ignored with a log line: it only saves
round trips, it decides nothing about trust.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.errors import StorageError
from hal.interfaces import Storage

log = logging.getLogger(__name__)

FILE_NAME = "est-server.json"
FORMAT = 1
MAX_FILE_BYTES = 256 * 1024


@dataclass(frozen=True)
class ServerMemory:
    server: str
    anchor_sha256: str
    basic: bool = False
    #: the cached /csrattrs: None = nothing cached; b"" = the server had none
    csrattrs: bytes | None = None
    csrattrs_fetched: datetime | None = None
    ca_set_sha256: str = ""
    #: the EST CA set the last success stored in cacerts.pem (fetched from this server under
    #: this anchor): only a stored set with this fingerprint replaces /cacerts
    cacerts_sha256: str = ""

    def csrattrs_for(
        self, *, ca_set_sha256: str, now: datetime, max_age: timedelta
    ) -> bytes | None:
        """The cached answer when it may be reused now, else None (pure)."""
        if self.csrattrs is None or self.csrattrs_fetched is None or max_age <= timedelta(0):
            return None
        if self.ca_set_sha256 != ca_set_sha256:
            return None
        age = now - self.csrattrs_fetched
        if age < timedelta(0) or age > max_age:  # a clock that went back counts as stale
            return None
        return self.csrattrs


def ca_set_sha256(certs: Sequence[x509.Certificate]) -> str:
    """One fingerprint for a set of CA certificates (order does not matter)."""
    ders = sorted(c.public_bytes(serialization.Encoding.DER) for c in certs)
    return hashlib.sha256(b"".join(hashlib.sha256(d).digest() for d in ders)).hexdigest()


class MemoryStore:
    def __init__(self, *, state_dir: Path, storage: Storage) -> None:
        self.state_dir = state_dir
        self.path = state_dir / FILE_NAME
        self._storage = storage

    def file_sha256(self, path: Path) -> str:
        """The SHA-256 of a file (the trust anchor), or "" when it cannot be read."""
        try:
            return hashlib.sha256(self._storage.read_bytes(path, limit=1024 * 1024)).hexdigest()
        except StorageError:
            return ""

    def load(self, *, server: str, anchor_sha256: str) -> ServerMemory:
        fresh = ServerMemory(server=server, anchor_sha256=anchor_sha256)
        try:
            if not self.path.exists():
                return fresh
            raw = self._storage.read_bytes(self.path, limit=MAX_FILE_BYTES)
        except (StorageError, OSError) as e:
            log.info("ignoring %s: %s", self.path, e)
            return fresh
        try:
            data = json.loads(raw)
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            if data["server"] != server or data["anchor_sha256"] != anchor_sha256:
                log.info("%s is about another server or anchor: not used", self.path)
                return fresh
            csrattrs = data.get("csrattrs")
            fetched = data.get("csrattrs_fetched")
            return ServerMemory(
                server=server,
                anchor_sha256=anchor_sha256,
                basic=data.get("basic") is True,
                csrattrs=base64.b64decode(csrattrs, validate=True)
                if csrattrs is not None
                else None,
                csrattrs_fetched=datetime.fromisoformat(fetched) if fetched else None,
                ca_set_sha256=str(data.get("ca_set_sha256", "")),
                cacerts_sha256=str(data.get("cacerts_sha256", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring %s: not a server memory file (%s)", self.path, e)
            return fresh

    def save(self, memory: ServerMemory) -> None:
        data = {
            "format": FORMAT,
            "server": memory.server,
            "anchor_sha256": memory.anchor_sha256,
            "basic": memory.basic,
            "csrattrs": (
                base64.b64encode(memory.csrattrs).decode("ascii")
                if memory.csrattrs is not None
                else None
            ),
            "csrattrs_fetched": (
                memory.csrattrs_fetched.isoformat() if memory.csrattrs_fetched else None
            ),
            "ca_set_sha256": memory.ca_set_sha256,
            "cacerts_sha256": memory.cacerts_sha256,
        }
        self._storage.ensure_private_dir(self.state_dir)
        self._storage.atomic_write(self.path, json.dumps(data, indent=1).encode() + b"\n")
