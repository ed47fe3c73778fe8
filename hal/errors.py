"""The errors hal raises, in a leaf module both layers import (it imports nothing of ours).

`AgentError` is the root of every error devid-agent raises on purpose; it is defined here, at
the bottom of the import graph, so that hal's errors belong to the same tree without hal
importing `agent`. `agent.errors` re-exports all of these and adds the rest of the tree.
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "BootControlError",
    "Busy",
    "HalError",
    "KeyStoreError",
    "ProviderError",
    "StorageError",
    "TrustError",
]


class AgentError(Exception):
    """Root of every error devid-agent raises on purpose."""


class Busy(AgentError):
    """Another process holds the lock this operation needs. Retry when it is done.

    Not a transport error: nothing went over the network, and it clears in seconds.
    """


class TrustError(AgentError):
    """A security check failed. Never blindly retried. (Here because hal finds some: a TPM
    counter index someone else defined.)"""


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
