"""Publishes what this daemon holds to the peer index, driven by the store's events.

The store emits ``stored`` only once a chunk can be fetched and ``removed`` /
``cleared`` once it cannot (kvstore/events.py). :class:`HoldingsBook` folds
those events into "which chunks does some local tier hold" (shared tiers
such as Redis do not count: a peer is asked only for what it holds itself),
and :class:`Publisher` writes the differences to the index every
``PUBLISH_INTERVAL_S``, renews its entries every heartbeat, and publishes
everything again after anything it could have missed: the first start, a
full event queue (events dropped), an index that was unreachable or lost its
data (a heartbeat finds the entries gone).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from redis import exceptions as rex

from kvstore.codecs.container import unpack
from kvstore.errors import CodecError
from kvstore.events import EventQueue, StoreEvent
from kvstore.keys import ChunkKey, NamespaceId
from kvstore.service.migration.peers_index import PeerIndex
from kvstore.tiers.base import Tier
from kvstore.tiers.store import TieredStore

log = logging.getLogger("kvstore.peers")
PUBLISH_INTERVAL_S = 0.05
INDEX_ERRORS = (rex.RedisError, OSError, TimeoutError)


@dataclass(slots=True)
class _Held:
    namespace: NamespaceId
    size: int
    tiers: set[str]


@dataclass(slots=True)
class Delta:
    """Entries to add (key -> size) and remove, per namespace."""

    added: dict[NamespaceId, dict[ChunkKey, int]] = field(default_factory=dict)
    removed: dict[NamespaceId, set[ChunkKey]] = field(default_factory=dict)

    def add(self, ns: NamespaceId, key: ChunkKey, size: int) -> None:
        self.removed.get(ns, set()).discard(key)
        self.added.setdefault(ns, {})[key] = size

    def remove(self, ns: NamespaceId, key: ChunkKey) -> None:
        self.added.get(ns, {}).pop(key, None)
        self.removed.setdefault(ns, set()).add(key)

    def namespaces(self) -> set[NamespaceId]:
        return {ns for ns, d in self.added.items() if d} | {ns for ns, r in self.removed.items() if r}


class HoldingsBook:
    """Which chunks some local tier of ``store`` holds, with their decoded sizes.

    Invariant: a key is in the book exactly while at least one local tier is
    known (through events or a snapshot) to hold it; every change is also
    recorded in the pending :class:`Delta` until the publisher takes it.
    Touched from one thread at a time (the publisher's).
    """

    def __init__(self, store: TieredStore) -> None:
        self.store = store
        self._local = {t.name: t for t in store.tiers if not t.shared}
        self._held: dict[ChunkKey, _Held] = {}
        self.pending = Delta()

    def __len__(self) -> int:
        return len(self._held)

    def by_namespace(self) -> dict[NamespaceId, dict[ChunkKey, int]]:
        out: dict[NamespaceId, dict[ChunkKey, int]] = {}
        for key, held in self._held.items():
            out.setdefault(held.namespace, {})[key] = held.size
        return out

    def snapshot(self) -> None:
        """Rebuild the book from the local tiers (blocking: a disk tier is scanned)."""
        self._held.clear()
        self.pending = Delta()
        for tier in self._local.values():
            for key in list(tier.keys()):
                self._stored(tier, key)

    def apply(self, events: list[StoreEvent]) -> None:
        for ev in events:
            tier = self._local.get(ev.tier)
            if tier is None:
                continue
            if ev.kind == "cleared":
                self._cleared(ev.tier, ev.namespace)
            elif ev.key is not None and ev.kind == "stored":
                self._stored(tier, ev.key)
            elif ev.key is not None:
                self._removed(ev.tier, ev.key)

    def _stored(self, tier: Tier, key: ChunkKey) -> None:
        held = self._held.get(key)
        if held is not None:
            held.tiers.add(tier.name)
            return
        meta = tier.meta(key)
        size = self._raw_size(tier, key, meta.nbytes) if meta is not None else None
        if meta is None or size is None:
            return  # gone again already: its removal follows
        self._held[key] = _Held(meta.namespace, size, {tier.name})
        self.pending.add(meta.namespace, key, size)

    def _raw_size(self, tier: Tier, key: ChunkKey, nbytes: int) -> int | None:
        """The size a GET returns: the stored size, or the decoded size of a codec container."""
        if not self.store.codecs.encoded(tier.name):
            return nbytes
        got = tier.read(key)
        if got is None:
            return None
        try:
            return unpack(got[0], verify=False).nbytes
        except CodecError:
            return None

    def _removed(self, tier: str, key: ChunkKey) -> None:
        held = self._held.get(key)
        if held is None:
            return
        held.tiers.discard(tier)
        if not held.tiers:
            del self._held[key]
            self.pending.remove(held.namespace, key)

    def _cleared(self, tier: str, ns: NamespaceId | None) -> None:
        for key, held in list(self._held.items()):
            if ns is None or held.namespace == ns:
                self._removed(tier, key)


@dataclass(slots=True)
class PublishStats:
    """Counters of the publisher (event loop only)."""

    published: int = 0
    withdrawn: int = 0
    republished: int = 0
    index_errors: int = 0
    held: int = 0


class Publisher:
    """Keeps this daemon's index entries equal to its holdings (see the module docstring).

    Lifecycle: :meth:`start` runs the loop as a task; :meth:`close` stops it
    and withdraws the entries (best effort: otherwise they expire after ttl).
    """

    def __init__(
        self, store: TieredStore, queue: EventQueue, index: PeerIndex, address: str, heartbeat_s: float,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.book = HoldingsBook(store)
        self.queue = queue
        self.index = index
        self.address = address
        self.heartbeat_s = heartbeat_s
        self.stats = PublishStats()
        self._dropped_seen = 0
        self._full = True  # publish everything (again) at the next step
        self._next_beat = 0.0
        self._task: asyncio.Task[None] | None = None
        self._clock = clock

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kvstore-peer-publisher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await asyncio.wait_for(self.index.withdraw(list(self.book.by_namespace())), 2.0)
        except INDEX_ERRORS:
            pass

    async def _run(self) -> None:
        while True:
            try:
                await self.step()
            except INDEX_ERRORS as exc:
                self.stats.index_errors += 1
                self._full = True
                log.warning("peer index unreachable: %s", exc)
                await asyncio.sleep(min(self.heartbeat_s, 1.0))
            await asyncio.sleep(PUBLISH_INTERVAL_S)

    async def step(self) -> None:
        """Fold new events in, write the differences (or everything), and heartbeat when due.

        Raises:
            redis.RedisError, OSError, TimeoutError: the index is unreachable (the next step
            publishes everything again).
        """
        if self.queue.dropped != self._dropped_seen:
            self._dropped_seen = self.queue.dropped
            self._full = True
        full = self._full
        await asyncio.to_thread(self._fold, full)
        self.stats.held = len(self.book)
        if full:
            await self._publish_all()
            self._full = False
        else:
            await self._publish_delta()
        if self._now() >= self._next_beat:
            await self._heartbeat()

    def _fold(self, full: bool) -> None:
        events = self.queue.drain()
        if full:
            self.book.snapshot()
        else:
            self.book.apply(events)

    async def _publish_all(self) -> None:
        holdings = self.book.by_namespace()
        for ns, added in holdings.items():
            await self.index.publish(ns, self.address, added, (), replace=True)
            self.stats.published += len(added)
        self.book.pending = Delta()
        self.stats.republished += 1
        self._next_beat = self._now() + self.heartbeat_s

    async def _publish_delta(self) -> None:
        delta = self.book.pending
        for ns in delta.namespaces():
            added, removed = delta.added.get(ns, {}), delta.removed.get(ns, set())
            await self.index.publish(ns, self.address, added, removed)
            self.stats.published += len(added)
            self.stats.withdrawn += len(removed)
            delta.added.pop(ns, None)
            delta.removed.pop(ns, None)

    async def _heartbeat(self) -> None:
        holdings = self.book.by_namespace()
        lost = await self.index.heartbeat(list(holdings), self.address)
        for ns in lost:
            await self.index.publish(ns, self.address, holdings[ns], (), replace=True)
            self.stats.republished += 1
        self._next_beat = self._now() + self.heartbeat_s
