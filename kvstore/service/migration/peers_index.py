"""The shared peer index in Redis / Valkey (standalone or Cluster): who holds which chunk.

Keys (``P`` the configured prefix, ``N`` a namespace id in hex)::

    P:{N}:peers       HASH  peer id -> {"addr": "host:port", "seen": unix time}   (EXPIRE ttl)
    P:{N}:chunks:ID   HASH  chunk key (32 bytes) -> decoded size in bytes          (EXPIRE ttl)

Every key of one namespace carries the hash tag ``{N}``, so a namespace lives
in one Cluster slot and each operation is one pipelined round trip to one
node. A tenant's lookups read only its own namespace's keys, so tenants never
see each other's entries. A daemon writes only its own ``chunks`` hash and
its own field of ``peers``; its heartbeat renews both TTLs, so when it stops
(crash, partition) its entries vanish within ``ttl`` without anyone's help.
``peers`` fields of daemons unseen for ``PRUNE_AFTER_TTLS`` TTLs are pruned
by the others' heartbeats.

Everything read back is network data: malformed entries are skipped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster

from kvstore.keys import ChunkKey, NamespaceId
from kvstore.service.migration.peers_config import PeerConfig, split_address

PRUNE_AFTER_TTLS = 10
WRITE_BATCH = 1000
Client = aredis.Redis | RedisCluster


@dataclass(frozen=True, slots=True)
class PeerEntry:
    """One other daemon of a namespace as the index lists it."""

    peer_id: str
    address: str
    seen: float


@dataclass(frozen=True, slots=True)
class PeerRun:
    """What one peer holds of the asked keys: a size per key (None: not held)."""

    peer: PeerEntry
    sizes: tuple[int | None, ...]

    def run_from(self, start: int) -> int:
        """How many keys, from ``start``, this peer holds without a gap."""
        n = 0
        for size in self.sizes[start:]:
            if size is None:
                break
            n += 1
        return n


def connect(config: PeerConfig) -> Client:
    """A redis-py asyncio client of the index (Cluster-aware when configured)."""
    opts: dict[str, Any] = {"socket_timeout": config.timeout_s, "socket_connect_timeout": config.timeout_s}
    if config.cluster:
        return RedisCluster.from_url(config.index_url, **opts)
    return aredis.Redis.from_url(config.index_url, **opts)


class PeerIndex:
    """This daemon's reads and writes of the shared index (see the module docstring).

    Holds no state but the client; the publisher decides what to write.
    """

    def __init__(self, client: Client, prefix: str, peer_id: str, ttl_s: float) -> None:
        self.client = client
        self.prefix = prefix
        self.peer_id = peer_id
        self.ttl_ms = max(1, int(ttl_s * 1000))

    def _peers_key(self, ns: NamespaceId) -> str:
        return f"{self.prefix}:{{{bytes(ns).hex()}}}:peers"

    def _chunks_key(self, ns: NamespaceId, peer_id: str) -> str:
        return f"{self.prefix}:{{{bytes(ns).hex()}}}:chunks:{peer_id}"

    # -- writes (this daemon's own entries) -------------------------------------------------
    async def publish(
        self, ns: NamespaceId, address: str, added: Mapping[ChunkKey, int], removed: Iterable[ChunkKey],
        replace: bool = False,
    ) -> None:
        """Add and remove this daemon's entries of ``ns`` and renew its TTLs; ``replace`` starts afresh."""
        mine = self._chunks_key(ns, self.peer_id)
        pipe = self.client.pipeline(transaction=False)
        if replace:
            pipe.delete(mine)
        gone = [bytes(k) for k in removed]
        for i in range(0, len(gone), WRITE_BATCH):
            pipe.hdel(mine, *gone[i : i + WRITE_BATCH])
        items = [(bytes(k), int(v)) for k, v in added.items()]
        for i in range(0, len(items), WRITE_BATCH):
            pipe.hset(mine, mapping=dict(items[i : i + WRITE_BATCH]))
        pipe.pexpire(mine, self.ttl_ms)
        self._announce(pipe, ns, address)
        await pipe.execute()

    def _announce(self, pipe: Any, ns: NamespaceId, address: str) -> None:
        entry = json.dumps({"addr": address, "seen": time.time()})
        pipe.hset(self._peers_key(ns), self.peer_id, entry)
        pipe.pexpire(self._peers_key(ns), self.ttl_ms * PRUNE_AFTER_TTLS)

    async def heartbeat(self, namespaces: Sequence[NamespaceId], address: str) -> list[NamespaceId]:
        """Renew this daemon's entries of ``namespaces``; the namespaces whose entries were gone
        (expired while Redis was unreachable, or Redis restarted empty) and need publishing again."""
        if not namespaces:
            return []
        pipe = self.client.pipeline(transaction=False)
        for ns in namespaces:
            pipe.pexpire(self._chunks_key(ns, self.peer_id), self.ttl_ms)
            self._announce(pipe, ns, address)
        replies = await pipe.execute()
        return [ns for ns, renewed in zip(namespaces, replies[::3]) if not renewed]

    async def withdraw(self, namespaces: Sequence[NamespaceId]) -> None:
        """Remove every entry of this daemon (a graceful stop)."""
        if not namespaces:
            return
        pipe = self.client.pipeline(transaction=False)
        for ns in namespaces:
            pipe.delete(self._chunks_key(ns, self.peer_id))
            pipe.hdel(self._peers_key(ns), self.peer_id)
        await pipe.execute()

    # -- reads ------------------------------------------------------------------------------
    async def peers(self, ns: NamespaceId) -> list[PeerEntry]:
        """The other daemons the index lists for ``ns`` (unseen ones pruned on the way)."""
        raw = await self.client.hgetall(self._peers_key(ns))
        now, out, stale = time.time(), [], []
        horizon = self.ttl_ms / 1000 * PRUNE_AFTER_TTLS
        for name, value in raw.items():
            entry = _entry(name, value)
            if entry is None or entry.peer_id == self.peer_id:
                continue
            if now - entry.seen > horizon:
                stale.append(entry.peer_id)
                continue
            out.append(entry)
        if stale:
            await self.client.hdel(self._peers_key(ns), *stale)
        return out

    async def holders(self, ns: NamespaceId, peers: Sequence[PeerEntry], keys: Sequence[ChunkKey]) -> list[PeerRun]:
        """For each peer, the size it announced for each key (None where it announced none)."""
        if not peers or not keys:
            return []
        wire = [bytes(k) for k in keys]
        pipe = self.client.pipeline(transaction=False)
        for peer in peers:
            pipe.hmget(self._chunks_key(ns, peer.peer_id), wire)
        replies = await pipe.execute()
        return [PeerRun(peer, tuple(_size(v) for v in reply)) for peer, reply in zip(peers, replies)]


def _entry(name: object, value: object) -> PeerEntry | None:
    try:
        peer_id = name.decode() if isinstance(name, bytes) else str(name)
        data = json.loads(value)  # type: ignore[arg-type]
        address, seen = data["addr"], float(data["seen"])
        if not isinstance(address, str):
            return None
        split_address(address)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        return None
    return PeerEntry(peer_id, address, seen)


def _size(value: object) -> int | None:
    if value is None:
        return None
    try:
        size = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    return size if size > 0 else None
