"""Pulls chunks a lookup missed from peers the index names, verified, into the local store.

A pull asks the index which peers hold the keys after the local hit, takes
from the peer holding the longest run first (then from others where it
stops), GETs the chunks with the async client (``verify=True``: each chunk
is checked against the checksum the peer stored), compares each size with
the announced one, and stores the chunks locally. Every failure of an entry
the index did list (a dead or evicted peer, wrong bytes, a refusal, an
unreachable index, the time bound) ends that run as a miss counted with its
:data:`MissReason`; nothing is raised to the caller. The whole pull is
bounded by ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from kvstore.buffers import U8
from kvstore.client.aio import AsyncClient
from kvstore.errors import Busy, ChunkCorrupt, InvalidInput, KVStoreError
from kvstore.keys import ChunkKey, Namespace
from kvstore.service.migration.peers_config import PeerConfig
from kvstore.service.migration.peers_index import PeerEntry, PeerIndex, PeerRun
from kvstore.service.migration.peers_publish import INDEX_ERRORS

log = logging.getLogger("kvstore.peers")

MissReason = Literal[
    "index_unavailable", "peer_unreachable", "peer_evicted", "corrupt", "size_mismatch", "forbidden",
    "timeout", "store_full", "peer_error",
]
MISS_REASONS: tuple[MissReason, ...] = (
    "index_unavailable", "peer_unreachable", "peer_evicted", "corrupt", "size_mismatch", "forbidden",
    "timeout", "store_full", "peer_error",
)  # fmt: skip
BATCH_BYTES = 64 << 20
PEERS_CACHE_S = 1.0
MAX_CLIENTS = 64
StorePut = Callable[[Namespace, ChunkKey, U8], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class PullResult:
    """What one lookup got from peers.

    Attributes:
        pulled: chunks now stored locally, counted from the first asked key without a gap.
        nbytes: bytes of those chunks.
        misses: stale or failed index entries met, by reason (empty when nothing failed).
    """

    pulled: int
    nbytes: int
    misses: Mapping[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class PullStats:
    """Counters of peer pulls (event loop only)."""

    lookups: int = 0
    index_hits: int = 0
    pulled_chunks: int = 0
    pulled_bytes: int = 0
    misses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MISS_REASONS, 0))


class _Miss(Exception):
    def __init__(self, reason: MissReason, stored: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.stored = stored


class PeerPuller:
    """Finds and pulls chunks from peers (see the module docstring).

    Holds a small pool of clients, one per (peer address, token); a client
    that failed is closed and dropped, and its peer is skipped for a back-off.
    """

    def __init__(self, index: PeerIndex, config: PeerConfig, tokens: Mapping[str, str], put: StorePut) -> None:
        self.index = index
        self.config = config
        self.tokens = dict(tokens)  # tenant -> token presented for that tenant
        self.put = put
        self.stats = PullStats()
        self._clients: dict[tuple[str, str | None], tuple[AsyncClient, set[bytes]]] = {}
        self._down_until: dict[str, float] = {}
        self._peers_cache: dict[bytes, tuple[float, list[PeerEntry]]] = {}

    async def close(self) -> None:
        for client, _ in self._clients.values():
            await client.close()
        self._clients.clear()

    async def pull(self, ns: Namespace, keys: Sequence[ChunkKey]) -> PullResult:
        """Pull the longest run of ``keys`` (from the first) that peers hold into the local store."""
        keys = list(keys[: self.config.max_chunks])
        misses: dict[str, int] = {}
        got = [0, 0]  # chunks, bytes
        if not keys:
            return PullResult(0, 0)
        self.stats.lookups += 1
        try:
            async with asyncio.timeout(self.config.timeout_s):
                await self._pull(ns, keys, got, misses)
        except TimeoutError:
            misses["timeout"] = misses.get("timeout", 0) + 1
        except INDEX_ERRORS as exc:
            log.warning("peer index unreachable during a lookup: %s", exc)
            misses["index_unavailable"] = misses.get("index_unavailable", 0) + 1
        for reason, n in misses.items():
            self.stats.misses[reason] = self.stats.misses.get(reason, 0) + n
        self.stats.pulled_chunks += got[0]
        self.stats.pulled_bytes += got[1]
        return PullResult(got[0], got[1], misses)

    async def _pull(self, ns: Namespace, keys: list[ChunkKey], got: list[int], misses: dict[str, int]) -> None:
        now = time.monotonic()
        peers = [p for p in await self._peers(ns) if self._down_until.get(p.peer_id, 0.0) <= now]
        runs = await self.index.holders(ns.id, peers, keys)
        self.stats.index_hits += sum(r.run_from(0) for r in runs)
        tried: set[str] = set()
        pos = 0
        while pos < len(keys):
            best = max((r for r in runs if r.peer.peer_id not in tried), key=lambda r: r.run_from(pos), default=None)
            n = best.run_from(pos) if best is not None else 0
            if best is None or n == 0:
                return
            try:
                stored = await self._from_peer(ns, best, keys, pos, n, got)
            except _Miss as miss:
                misses[miss.reason] = misses.get(miss.reason, 0) + 1
                tried.add(best.peer.peer_id)
                stored = miss.stored
            pos += stored

    async def _peers(self, ns: Namespace) -> list[PeerEntry]:
        now = time.monotonic()
        cached = self._peers_cache.get(bytes(ns.id))
        if cached is not None and cached[0] > now:
            return cached[1]
        peers = await self.index.peers(ns.id)
        self._peers_cache[bytes(ns.id)] = (now + min(PEERS_CACHE_S, self.config.heartbeat_s), peers)
        return peers

    async def _from_peer(self, ns: Namespace, run: PeerRun, keys: list[ChunkKey], pos: int, n: int,
                         got: list[int]) -> int:
        """Pull ``keys[pos:pos+n]`` from one peer in batches; how many were stored (or a _Miss)."""
        stored = 0
        while stored < n:
            batch: list[int] = []
            total = 0
            while stored + len(batch) < n and (not batch or total < BATCH_BYTES):
                size = run.sizes[pos + stored + len(batch)]
                assert size is not None  # run_from counted only announced keys
                batch.append(size)
                total += size
            start = pos + stored
            try:
                done = await self._batch(ns, run.peer, keys[start : start + len(batch)], batch, got)
            except _Miss as miss:
                raise _Miss(miss.reason, stored + miss.stored) from None
            stored += done
        return stored

    async def _batch(self, ns: Namespace, peer: PeerEntry, keys: list[ChunkKey], sizes: list[int],
                     got: list[int]) -> int:
        outs = [np.empty(size, dtype=np.uint8) for size in sizes]
        client = await self._client(peer, ns)
        try:
            found = await client.get_many(ns, keys, outs)
        except BaseException as exc:
            await self._drop(peer, ns)  # a reply may be half read: never reuse the connection
            raise _Miss(_reason(exc)) from None
        stored = 0
        for key, out, size, n in zip(keys, outs, sizes, found):
            if n is None:
                raise _Miss("peer_evicted", stored)
            if n != size:
                raise _Miss("size_mismatch", stored)
            if not await self.put(ns, key, out):
                raise _Miss("store_full", stored)
            stored += 1
            got[0] += 1
            got[1] += n
        return stored

    async def _client(self, peer: PeerEntry, ns: Namespace) -> AsyncClient:
        token = self.tokens.get(ns.tenant, self.config.token)
        slot = (peer.address, token)
        entry = self._clients.get(slot)
        try:
            if entry is None:
                if len(self._clients) >= MAX_CLIENTS:
                    old, _ = self._clients.pop(next(iter(self._clients)))
                    await old.close()
                client = await AsyncClient.connect(
                    f"kvstore://{peer.address}", token=token, timeout_s=self.config.timeout_s, retries=0,
                    pool_size=1, use_shm=False, verify=True,
                )
                entry = self._clients[slot] = (client, set())
            if bytes(ns.id) not in entry[1]:
                await entry[0].register(ns)
                entry[1].add(bytes(ns.id))
        except BaseException as exc:
            reason = _reason(exc)
            if reason == "peer_unreachable":
                self._down_until[peer.peer_id] = time.monotonic() + min(5.0, self.config.heartbeat_s)
            await self._drop(peer, ns)
            raise _Miss(reason) from None
        return entry[0]

    async def _drop(self, peer: PeerEntry, ns: Namespace) -> None:
        slot = (peer.address, self.tokens.get(ns.tenant, self.config.token))
        entry = self._clients.pop(slot, None)
        if entry is not None:
            await entry[0].close()


def _reason(exc: BaseException) -> MissReason:
    """The miss reason of a failed peer request (a cancellation is re-raised)."""
    if isinstance(exc, asyncio.CancelledError):
        raise exc
    if isinstance(exc, ChunkCorrupt):
        return "corrupt"
    if isinstance(exc, PermissionError):
        return "forbidden"
    if isinstance(exc, InvalidInput):
        return "size_mismatch"  # the peer's chunk exceeds the announced size
    if isinstance(exc, (ConnectionError, TimeoutError, OSError, Busy)):
        return "peer_unreachable"
    if isinstance(exc, KVStoreError):
        return "peer_error"
    log.warning("unexpected error pulling from a peer", exc_info=exc)
    return "peer_error"
