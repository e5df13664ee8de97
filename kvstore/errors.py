"""The one exception hierarchy of kvstore.

Every error a caller can reach derives from :class:`KVStoreError`. Input
problems are also ``ValueError`` and remote outages are also
``ConnectionError`` so that generic handlers keep working.
"""

from __future__ import annotations


class KVStoreError(Exception):
    """Root of every error kvstore raises on purpose."""


class InvalidInput(KVStoreError, ValueError):
    """A caller passed a value that can never be valid (bad shape, dtype, token...)."""


class ShapeMismatch(InvalidInput):
    """A tensor's shape does not match what the KV spec says a chunk holds."""


class DTypeMismatch(InvalidInput):
    """A tensor's dtype does not match the KV spec's dtype."""


class UnknownNamespace(KVStoreError, KeyError):
    """A namespace id was used that the store has never registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown namespace"


class UnknownName(KVStoreError, KeyError):
    """A registry (policy, tier, hash scheme, codec) was asked for a name it does not hold."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown name"


class CapacityError(KVStoreError):
    """A value cannot fit: larger than the tier's budget, or everything is pinned."""


class ChunkTooLarge(CapacityError, InvalidInput):
    """A chunk exceeds the configured maximum chunk size."""


class DiskFull(CapacityError, OSError):
    """The filesystem under the disk tier has no room left."""


class ChunkCorrupt(KVStoreError):
    """A stored record failed its checksum, was truncated, or names another key."""


class CodecError(KVStoreError, ValueError):
    """A codec or container could not encode or decode a value."""


class RemoteUnavailable(KVStoreError, ConnectionError):
    """A remote tier (Redis/Valkey, a peer) cannot be reached right now."""


class LeaseError(KVStoreError):
    """A lease was used after it expired or was released, or does not exist."""


class Busy(KVStoreError):
    """A bounded queue is full; the caller should retry later (backpressure)."""
