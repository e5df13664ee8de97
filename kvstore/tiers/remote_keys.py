"""How the remote tier names chunks in Redis: ``key_prefix + key.hex()``, listed by a SCAN of the prefix.

Chunk keys are derived from their namespace, so two tenants never share a
Redis key; the record header repeats the namespace so that listing one
namespace filters the SCAN by reading headers only (GETRANGE). No index set is
kept, so nothing goes stale when Redis expires or evicts a value. Keys carry
no hash tag: in Cluster mode chunks spread over all slots.
"""

from __future__ import annotations

from typing import cast

from kvstore.errors import ChunkCorrupt
from kvstore.keys import KEY_BYTES, ChunkKey, NamespaceId
from kvstore.tiers.record import HEADER_BYTES, RecordHeader
from kvstore.tiers.remote_link import SCAN_COUNT, Client

_GLOB = str.maketrans({c: "\\" + c for c in "*?[]\\"})


class KeySpace:
    """The Redis keys under one prefix.

    Invariant: a Redis key names a chunk exactly when it is the prefix
    followed by the 64 hex digits of a chunk key; the SCAN pattern escapes
    the prefix's glob characters, so it matches no other prefix's keys.
    """

    def __init__(self, key_prefix: str) -> None:
        self._prefix = key_prefix.encode()
        self._pattern = key_prefix.translate(_GLOB) + "*"

    def rkey(self, key: ChunkKey) -> bytes:
        """The Redis key of a chunk."""
        return self._prefix + key.hex().encode()

    def chunk_key(self, rkey: bytes) -> ChunkKey | None:
        """The chunk a Redis key names, or None if it names none."""
        tail = rkey[len(self._prefix) :]
        if not rkey.startswith(self._prefix) or len(tail) != 2 * KEY_BYTES:
            return None
        try:
            return ChunkKey(bytes.fromhex(tail.decode("ascii")))
        except ValueError:
            return None

    def scan(self, client: Client, namespace: NamespaceId | None) -> list[ChunkKey]:
        """The chunk keys under the prefix; of one namespace (read from the headers) if given."""
        found = [(rk, k) for rk in client.scan_iter(match=self._pattern, count=SCAN_COUNT)
                 if (k := self.chunk_key(cast(bytes, rk))) is not None]
        if namespace is None:
            return [k for _, k in found]
        keys: list[ChunkKey] = []
        for start in range(0, len(found), SCAN_COUNT):
            batch = found[start : start + SCAN_COUNT]
            pipe = client.pipeline(transaction=False)
            for rk, _ in batch:
                pipe.getrange(rk, 0, HEADER_BYTES - 1)
            for (_, key), raw in zip(batch, pipe.execute(raise_on_error=False)):
                if isinstance(raw, bytes) and _namespace_of(raw, key) == namespace:
                    keys.append(key)
        return keys


def _namespace_of(raw: bytes, key: ChunkKey) -> NamespaceId | None:
    try:
        return RecordHeader.unpack(raw, key).namespace
    except ChunkCorrupt:
        return None
