"""Peer sharing: daemons share what they hold through an index in Redis and pull from each other.

Usage (the daemon does this inside its aiohttp lifecycle)::

    peers = PeerService(store, fanout, config, tokens)
    await peers.start(bound_host, bound_port)     # publishes, heartbeats
    result = await peers.pull(ns, keys_after_local_hit)   # on a LOOKUP that missed locally
    await peers.close()                           # withdraws this daemon's entries

``peers_index`` is the index's schema, ``peers_publish`` turns the store's
events into index entries, ``peers_pull`` finds and pulls chunks. The data
plane's LOOKUP calls :meth:`PeerService.pull` after the local tiers missed
and answers with the extended hit. Deployment: docs/peers.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from kvstore.buffers import U8
from kvstore.connectors.vllm_events import EventFanout
from kvstore.errors import CapacityError, InvalidInput
from kvstore.keys import ChunkKey, Namespace
from kvstore.service.migration.peers_config import PeerConfig
from kvstore.service.migration.peers_index import PeerIndex, connect
from kvstore.service.migration.peers_publish import Publisher
from kvstore.service.migration.peers_pull import PeerPuller, PullResult
from kvstore.tiers.store import TieredStore

__all__ = ["PeerConfig", "PeerService", "PeerStats", "PullResult"]


@dataclass(frozen=True, slots=True)
class PeerStats:
    """A snapshot of peer sharing's counters.

    Attributes:
        peer_id: this daemon's name in the index.
        address: the data-plane address it advertises.
        held: chunks this daemon holds in local tiers (and publishes).
        published: entries written to the index (additions, republishing included).
        withdrawn: entries removed from the index (evictions, deletions, clears).
        republished: times everything was published again (start, lost index data, dropped events).
        index_errors: publisher steps that failed because the index was unreachable.
        lookups: lookups that asked the index (a local miss).
        index_hits: chunks the index listed as held by some peer, summed over peers.
        pulled_chunks: chunks pulled from peers and stored locally.
        pulled_bytes: their bytes.
        misses: stale or failed entries by reason (each costs a miss, never an error).
    """

    peer_id: str
    address: str
    held: int
    published: int
    withdrawn: int
    republished: int
    index_errors: int
    lookups: int
    index_hits: int
    pulled_chunks: int
    pulled_bytes: int
    misses: Mapping[str, int]

    def to_wire(self) -> dict[str, object]:
        out = {f: getattr(self, f) for f in self.__slots__}
        out["misses"] = dict(self.misses)
        return out


class PeerService:
    """This daemon's side of peer sharing: publisher, puller, and the index client they share.

    Invariant: after :meth:`close` no task of it runs and its client is closed;
    its index entries are withdrawn (or expire within ``ttl_s``).
    """

    def __init__(
        self, store: TieredStore, events: EventFanout, config: PeerConfig, tokens: Mapping[str, str]
    ) -> None:
        """``tokens``: tenant -> bearer token this daemon presents to peers for that tenant."""
        self.store = store
        self.config = config
        self._events = events
        self._tokens = dict(tokens)
        self._queue = events.subscribe()
        self._client = connect(config)
        self.address = ""
        self.peer_id = config.peer_id or ""
        self._publisher: Publisher | None = None
        self._puller: PeerPuller | None = None

    async def start(self, host: str, port: int) -> None:
        """Start publishing as the data plane bound at ``host:port`` (or the advertised address)."""
        self.address = self.config.address(host, port)
        self.peer_id = self.config.name(self.address)
        index = PeerIndex(self._client, self.config.prefix, self.peer_id, self.config.ttl_s)
        self._publisher = Publisher(self.store, self._queue, index, self.address, self.config.heartbeat_s)
        self._puller = PeerPuller(index, self.config, self._tokens, self._put)
        self._publisher.start()

    async def close(self) -> None:
        if self._publisher is not None:
            await self._publisher.close()
        if self._puller is not None:
            await self._puller.close()
        self._events.unsubscribe(self._queue)
        await self._client.aclose()

    async def pull(self, ns: Namespace, keys: Sequence[ChunkKey]) -> PullResult:
        """Pull the longest run of ``keys`` peers hold into the local store; never raises for a
        stale entry or an unreachable peer or index (those are counted misses)."""
        if self._puller is None:
            return PullResult(0, 0)
        return await self._puller.pull(ns, keys)

    async def _put(self, ns: Namespace, key: ChunkKey, data: U8) -> bool:
        return await asyncio.to_thread(_put_local, self.store, ns, key, data)

    def stats(self) -> PeerStats:
        pub = self._publisher.stats if self._publisher is not None else None
        pull = self._puller.stats if self._puller is not None else None
        return PeerStats(
            peer_id=self.peer_id, address=self.address,
            held=pub.held if pub else 0, published=pub.published if pub else 0,
            withdrawn=pub.withdrawn if pub else 0, republished=pub.republished if pub else 0,
            index_errors=pub.index_errors if pub else 0,
            lookups=pull.lookups if pull else 0, index_hits=pull.index_hits if pull else 0,
            pulled_chunks=pull.pulled_chunks if pull else 0, pulled_bytes=pull.pulled_bytes if pull else 0,
            misses=dict(pull.misses) if pull else {},
        )  # fmt: skip


def _put_local(store: TieredStore, ns: Namespace, key: ChunkKey, data: U8) -> bool:
    """Store a pulled chunk unless a local tier holds the key for another namespace."""
    top = store.top.meta(key)
    if top is not None:
        return top.namespace == ns.id
    try:
        return store.put(ns, key, data)
    except (CapacityError, InvalidInput):
        return False


class PeerCollector(Collector):
    """Prometheus families of peer sharing (``kvstore_peer_*``), read at every scrape."""

    def __init__(self, service: PeerService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        s = self.service.stats()
        counters = {
            "lookups": ("lookups that asked the peer index after a local miss", s.lookups),
            "pulled_chunks": ("chunks pulled from peers", s.pulled_chunks),
            "pulled_bytes": ("bytes pulled from peers", s.pulled_bytes),
            "published": ("entries written to the peer index", s.published),
            "withdrawn": ("entries removed from the peer index", s.withdrawn),
            "index_errors": ("publisher steps that failed: index unreachable", s.index_errors),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"kvstore_peer_{name}", doc, value=value)
        misses = CounterMetricFamily(
            "kvstore_peer_misses", "stale or failed peer index entries, by reason", labels=["reason"]
        )
        for reason, n in sorted(s.misses.items()):
            misses.add_metric([reason], n)
        yield misses
        yield GaugeMetricFamily("kvstore_peer_held_chunks", "chunks this daemon publishes", value=s.held)
