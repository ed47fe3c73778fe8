"""The EST CA set as the scheduled refresh sees it (agent/ca_service.py): the explicit anchor
that authenticates the server, `/cacerts` fetched over it, the stored set, and the adoption of a
set the refresh judged. The same anchor, store, EST memory and lock as enrollment, without the
enrollment code: the service's long-lived process uses it, and leaves the network to its
attempt process (agent/attempt_process.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from cryptography import x509

from agent.config import Config
from agent.errors import StorageError
from agent.est import trust
from agent.est.memory import MemoryStore, ca_set_sha256
from agent.identity import IdentityStore


def server_name(config: Config) -> str:
    """The EST server as its memory (agent/est/memory.py) names it."""
    return f"{config.est.url} label={config.est.label}"


class EstCaSource:
    def __init__(
        self,
        *,
        config: Config,
        store: IdentityStore,
        memory: MemoryStore,
        fetch: Callable[[Path], list[x509.Certificate]],
    ) -> None:
        self._config = config
        self._store = store
        self._memory = memory
        self._fetch = fetch

    def explicit_anchor(self) -> Path | None:
        """The anchor file that authenticates the EST server, or None before a fingerprint
        bootstrap stored one (a refresh never bootstraps: that is for enrollment)."""
        est = self._config.est
        return trust.configured_anchor(
            trust_anchor=est.trust_anchor,
            state_dir=self._config.paths.state_dir,
            fingerprint=est.bootstrap_fingerprint_sha256,
        )

    def fetch_cacerts(self, anchor: Path) -> list[x509.Certificate]:
        """GET /cacerts over TLS verified against `anchor`; no client certificate (RFC 7030
        4.1.1: anonymous), so no TPM object is used; in the service, by its attempt process."""
        return self._fetch(anchor)

    def stored_ca_set(self) -> list[x509.Certificate]:
        """The stored EST CA set (empty before the first enrollment)."""
        pem = self._store.cacerts_pem()
        if not pem:
            return []
        try:
            return x509.load_pem_x509_certificates(pem)
        except ValueError as e:
            raise StorageError(f"{self._store.cacerts_file}: not PEM certificates: {e}") from e

    def adopt_ca_set(self, certs: list[x509.Certificate], anchor: Path) -> None:
        """Replace the stored CA set with one the CA refresh judged (agent/ca_refresh.py),
        atomically, under the enrollment lock, and remember it as this server's so that the
        next enrollment uses it instead of fetching /cacerts."""
        with self._store.exclusive():
            memory = self._memory.load(
                server=server_name(self._config), anchor_sha256=self._memory.file_sha256(anchor)
            )
            # the memory first: cut between the two, the stored set no longer matches it, so the
            # next enrollment fetches /cacerts and the next refresh stores the set again
            self._memory.save(replace(memory, cacerts_sha256=ca_set_sha256(certs)))
            self._store.replace_cacerts(certs)
