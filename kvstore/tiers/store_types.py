"""Configuration and result types of the tiered store."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from kvstore.errors import InvalidInput
from kvstore.keys import ChunkKey
from kvstore.tiers.base import TierStats
from kvstore.tiers.leases import LeaseId, LeaseStats
from kvstore.tiers.tier_codecs import CodecChoice
from kvstore.tiers.writer import WriterStats

WriteMode = Literal["write_through", "write_back"]


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Configuration of the tiered store.

    Attributes:
        write_mode: ``write_through`` copies every chunk to every lower tier in
            the background; ``write_back`` copies a chunk down only when the top
            tier evicts it.
        queue_depth: bound on queued background writes (jobs).
        queue_timeout_s: how long a producer waits on a full queue before the
            lower-tier write is dropped (counted).
        lease_ttl_s: default lifetime of a lookup's lease.
        max_leases: bound on live leases; more raise CapacityError.
        promote_on_hit: copy a chunk read from a lower tier into the top tier.
        max_chunk_bytes: the largest chunk accepted; larger raise ChunkTooLarge.
        reaper_interval_s: how often the background reaper expires leases.
        codecs: tier name -> the codec that tier stores chunks with (docs/codecs.md);
            tiers not named hold raw KV. The top tier always holds raw KV.
    """

    write_mode: WriteMode = "write_through"
    queue_depth: int = 64
    queue_timeout_s: float = 5.0
    lease_ttl_s: float = 30.0
    max_leases: int = 65536
    promote_on_hit: bool = True
    max_chunk_bytes: int = 1 << 30
    reaper_interval_s: float = 0.25
    codecs: Mapping[str, CodecChoice] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.write_mode not in ("write_through", "write_back"):
            raise InvalidInput(f"write_mode must be write_through or write_back, got {self.write_mode!r}")
        if self.queue_depth < 1:
            raise InvalidInput("queue_depth must be >= 1")
        if self.queue_timeout_s < 0:
            raise InvalidInput("queue_timeout_s must be >= 0")
        if self.lease_ttl_s <= 0:
            raise InvalidInput("lease_ttl_s must be > 0")
        if self.max_leases < 1:
            raise InvalidInput("max_leases must be >= 1")
        if self.max_chunk_bytes < 1:
            raise InvalidInput("max_chunk_bytes must be >= 1")
        if self.reaper_interval_s <= 0:
            raise InvalidInput("reaper_interval_s must be > 0")


@dataclass(frozen=True, slots=True)
class LookupResult:
    """The longest cached prefix of a query.

    Attributes:
        hit_tokens: tokens covered by the hit chunks (a multiple of the chunk size).
        keys: the hit chunks' keys, in order.
        tiers: for each hit chunk, the name of the fastest tier holding it.
        query_chunks: full chunks in the query (hit or not).
        lease: the lease pinning the hits in local tiers, or None if not asked
            for or nothing was hit.
    """

    hit_tokens: int
    keys: tuple[ChunkKey, ...]
    tiers: tuple[str, ...]
    query_chunks: int
    lease: LeaseId | None

    @property
    def hit_chunks(self) -> int:
        return len(self.keys)


@dataclass(frozen=True, slots=True)
class StoreStats:
    """A snapshot of the store's counters and of every tier's."""

    tiers: tuple[TierStats, ...]
    leases: LeaseStats
    writer: WriterStats
    lookups: int
    lookup_query_chunks: int
    lookup_hit_chunks: int
    gets: int
    get_hits: int
    get_misses: int
    promotions: int
    decode_errors: int
    namespaces: int
    index_entries: int
