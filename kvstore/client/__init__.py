"""The Python client of the kvstore daemon: :class:`Client` (blocking) and :class:`AsyncClient`.

Both have the same methods (the async ones are awaitable), accept bytes,
numpy arrays and CPU torch tensors, pool their connections, retry what is
safe to retry, and raise typed exceptions (all :class:`kvstore.errors.KVStoreError`).
See docs/client.md.
"""

from kvstore.client._frames import ClientOptions, Endpoint, LookupHit, RemoteStats, ServerInfo, parse_url
from kvstore.client.aio import AsyncClient
from kvstore.client.sync import Client
from kvstore.errors import (
    Busy,
    CapacityError,
    ChunkCorrupt,
    InvalidInput,
    KVStoreError,
    LeaseError,
    RemoteUnavailable,
    UnknownNamespace,
)
from kvstore.service.protocol import (
    Forbidden,
    PayloadTooLarge,
    ProtocolError,
    RequestTimeout,
    ServerBusy,
    ServerError,
    ShuttingDown,
    Unauthorized,
    UnknownMessageType,
)

__all__ = [
    "AsyncClient", "Busy", "CapacityError", "ChunkCorrupt", "Client", "ClientOptions", "Endpoint", "Forbidden",
    "InvalidInput", "KVStoreError", "LeaseError", "LookupHit", "PayloadTooLarge", "ProtocolError", "RemoteStats",
    "RemoteUnavailable", "RequestTimeout", "ServerBusy", "ServerError", "ServerInfo", "ShuttingDown",
    "Unauthorized", "UnknownMessageType", "UnknownNamespace", "parse_url",
]  # fmt: skip
