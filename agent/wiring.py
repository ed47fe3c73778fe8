"""The one place where implementations are chosen from the config."""

from __future__ import annotations

from agent.config import Config, KeyStoreKind
from hal.interfaces import KeyStore
from hal.openssl_provider import ProviderInfo, load_tpm2_provider


def key_store(config: Config) -> KeyStore:
    if config.keys.store is KeyStoreKind.TPM:
        from hal.tpm import TpmKeyStore

        return TpmKeyStore(tcti=config.tpm.tcti)
    from hal.softkeys import SoftwareKeyStore

    return SoftwareKeyStore()


def load_provider(config: Config) -> ProviderInfo:
    """Load the configured tpm2 OpenSSL provider for the configured TPM into this process."""
    provider = str(config.tpm.openssl_provider) if config.tpm.openssl_provider else None
    return load_tpm2_provider(provider, tcti=config.tpm.tcti)


def prepare_tls(config: Config) -> ProviderInfo | None:
    """Load the tpm2 OpenSSL provider when TLS will sign with TPM keys. Call before any TLS."""
    if config.keys.store is not KeyStoreKind.TPM:
        return None
    return load_provider(config)
