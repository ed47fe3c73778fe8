"""The error tree. One root; retryable and security branches kept apart.

The CLI maps each branch to an exit code and prints `str(error)`: every message is one line that
names what was wrong and where.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error devid-agent raises on purpose."""


class ConfigError(AgentError):
    """The configuration is missing, malformed or inconsistent."""


class TransportError(AgentError):
    """The network failed or the server asked us to come back later. May be retried."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after  # seconds, when the server said so


class Busy(TransportError):
    """Another process holds the lock this operation needs. Retry when it is done."""


class EnrollmentError(AgentError):
    """The EST server refused us or answered with something we cannot use."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EnrollmentPending(AgentError):
    """The server accepted the request for manual approval (202); come back after `retry_after`."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TrustError(AgentError):
    """A security check failed. Never blindly retried."""


class ChainValidationError(TrustError):
    """A certificate does not chain to the configured trust anchor, or is not valid now."""


class FirmwareVerificationError(TrustError):
    """A firmware bundle failed verification."""


class RollbackError(TrustError):
    """A firmware bundle's security version is below the committed one."""


class HalError(AgentError):
    """The hardware or the disk failed."""


class KeyStoreError(HalError):
    """The key store (TPM or key files) failed."""


class ProviderError(HalError):
    """The OpenSSL provider needed for TPM-backed TLS is missing or unusable."""


class BootControlError(HalError):
    """The bootloader environment could not be read or written, or is corrupt."""


class StorageError(HalError):
    """A file could not be read or written atomically."""
