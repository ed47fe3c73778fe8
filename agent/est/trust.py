"""Which CA authenticates the EST server: explicit, or bootstrapped by fingerprint. Never implicit.

1. `est.trust_anchor` (a PEM file) when configured;
2. else the anchor an earlier bootstrap stored (state_dir/est-anchor.pem);
3. else RFC 7030 4.1.1 bootstrap: fetch /cacerts over provisional TLS (nothing secret sent),
   accept the CA certificate whose SHA-256 equals `est.bootstrap_fingerprint_sha256`, verify the
   server's TLS certificate against it over a new connection, and only then store it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.errors import ChainValidationError, ConfigError, StorageError
from agent.est.response import fingerprint as fingerprint_of
from agent.est.response import normalize_fingerprint, select_bootstrap_anchor
from agent.layout import EST_ANCHOR_FILE_NAME
from hal.storage import atomic_write, ensure_private_dir, fsync_dir, read_bytes

if TYPE_CHECKING:  # the service's long-lived process reads the anchor without the EST client
    from agent.est.client import EstClient

log = logging.getLogger(__name__)

ANCHOR_FILE_NAME = EST_ANCHOR_FILE_NAME

#: makes an EstClient whose transport trusts the given anchor file (None: provisional only)
ClientFactory = Callable[[Path | None], "EstClient"]


def configured_anchor(
    *, trust_anchor: Path | None, state_dir: Path, fingerprint: str
) -> Path | None:
    """The anchor file to use, or None when a fingerprint bootstrap is needed."""
    if trust_anchor is not None:
        if not _is_file(trust_anchor, "est.trust_anchor"):
            raise ConfigError(f"est.trust_anchor: {trust_anchor} does not exist")
        return trust_anchor
    stored = state_dir / ANCHOR_FILE_NAME
    if _is_file(stored, "the stored EST anchor"):
        if fingerprint:
            _check_stored(stored, fingerprint)
        return stored
    if fingerprint:
        return None
    raise ConfigError(
        "est: no trust anchor for the EST server: set est.trust_anchor (a CA file) or "
        "est.bootstrap_fingerprint_sha256 (the EST CA's SHA-256 fingerprint)"
    )


def _check_stored(stored: Path, expected: str) -> None:
    """The stored anchor is the one the configured fingerprint names: a changed fingerprint
    means the operator no longer trusts what an earlier bootstrap stored."""
    try:
        anchor = x509.load_pem_x509_certificate(read_bytes(stored, limit=64 * 1024))
    except ValueError as e:
        raise StorageError(
            f"{stored}: not a PEM certificate ({e}); delete it to bootstrap again"
        ) from e
    if fingerprint_of(anchor) != normalize_fingerprint(expected):
        raise ConfigError(
            f"est.bootstrap_fingerprint_sha256 does not match the anchor an earlier bootstrap "
            f"stored in {stored} (SHA-256 {fingerprint_of(anchor)}); delete that file to "
            "bootstrap again with the new fingerprint"
        )


def _is_file(path: Path, what: str) -> bool:
    try:
        return path.is_file()
    except OSError as e:  # is_file() is False only for ENOENT & co.; EACCES raises
        raise ConfigError(f"{what}: cannot look at {path}: {e.strerror}") from e


def bootstrap(
    *, make_client: ClientFactory, fingerprint: str, state_dir: Path, group: int | None = None
) -> Path:
    """RFC 7030 4.1.1 bootstrap: the stored anchor file. On any failure nothing is stored."""
    certs = make_client(None).cacerts(provisional=True)
    anchor = select_bootstrap_anchor(certs, fingerprint)
    ensure_private_dir(state_dir, group=group)  # shared with `paths.identity_group`: kept so
    stored = state_dir / ANCHOR_FILE_NAME
    candidate = state_dir / f".{ANCHOR_FILE_NAME}.candidate"
    atomic_write(candidate, anchor.public_bytes(serialization.Encoding.PEM))
    try:
        make_client(candidate).cacerts()  # a verified handshake: the server holds a cert under it
    except ChainValidationError as e:
        candidate.unlink(missing_ok=True)
        raise ChainValidationError(
            "bootstrap: the CA certificate matches the fingerprint, but the EST server's TLS "
            f"certificate does not verify against it: {e}"
        ) from e
    except BaseException:
        candidate.unlink(missing_ok=True)
        raise
    os.replace(candidate, stored)
    fsync_dir(state_dir)
    log.warning(
        "bootstrap: trusting EST CA %r (SHA-256 %s) from now on, stored in %s",
        anchor.subject.rfc4514_string(),
        fingerprint,
        stored,
    )
    return stored
