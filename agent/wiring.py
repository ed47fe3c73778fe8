"""The one place where implementations are chosen from the config."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.config import Config, KeyStoreKind
from hal.interfaces import KeyStore, Lock, Storage

if TYPE_CHECKING:  # each builder imports what it builds: `status` must not pay for EST or TLS
    from agent.clock import Clock
    from agent.enroll import Enroller
    from agent.identity import IdentityStore
    from hal.openssl_provider import ProviderInfo


def key_store(config: Config) -> KeyStore:
    if config.keys.store is KeyStoreKind.TPM:
        from hal.tpm import TpmKeyStore

        return TpmKeyStore(tcti=config.tpm.tcti)
    from hal.softkeys import SoftwareKeyStore

    return SoftwareKeyStore()


def load_provider(config: Config) -> ProviderInfo:
    """Load the configured tpm2 OpenSSL provider for the configured TPM into this process."""
    from hal.openssl_provider import load_tpm2_provider

    provider = str(config.tpm.openssl_provider) if config.tpm.openssl_provider else None
    return load_tpm2_provider(provider, tcti=config.tpm.tcti)


def prepare_tls(config: Config) -> ProviderInfo | None:
    """Load the tpm2 OpenSSL provider when TLS will sign with TPM keys. Call before any TLS."""
    if config.keys.store is not KeyStoreKind.TPM:
        return None
    return load_provider(config)


def storage() -> Storage:
    from hal.disk import FileStorage

    return FileStorage()


def lock() -> Lock:
    from hal.disk import FlockLock

    return FlockLock()


def identity_store(config: Config) -> IdentityStore:
    from agent.identity import IdentityStore

    return IdentityStore(
        state_dir=config.paths.state_dir,
        storage=storage(),
        lock=lock(),
        generations_kept=config.est.generations_kept,
    )


def enroller(config: Config, *, clock: Clock | None = None) -> Enroller:
    """The enroller for the CLI (and the daemon): the configured key store, the disk, the
    system clock."""
    from agent.clock import SystemClock
    from agent.enroll import Enroller

    return Enroller(
        config=config,
        key_store=key_store(config),
        clock=clock or SystemClock(),
        storage=storage(),
        lock=lock(),
    )
