"""The tiered store: put / lookup / get / delete / pin across tiers.

Tiers are ordered fastest first; the first is an in-memory tier and takes
every put at once. Lower tiers are filled in the background (write-through)
or when the top tier evicts (write-back). A hit in a lower tier is promoted
to the top tier. The prefix index records which tiers hold each key; the
tiers report evictions, so it never names a chunk a local tier dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from kvstore.buffers import U8, BufferLike, as_u8, check_chunk, is_raw
from kvstore.codecs.base import CodecParams
from kvstore.errors import ChunkTooLarge, CodecError, InvalidInput, UnknownNamespace
from kvstore.events import EventSink, StoreEvent
from kvstore.index.chunk_cache import ChunkCacheEntry, ChunkCacheIndex
from kvstore.index.prefix import MAX_TIERS, PrefixIndex, tiers_of
from kvstore.keys import ChunkKey, Namespace, NamespaceId, TokenInput, as_token_array, content_key, iter_prefix_keys
from kvstore.tiers.arena import Extent
from kvstore.tiers.base import ChunkMeta, Tier
from kvstore.tiers.leases import LeaseId, LeaseTable
from kvstore.tiers.memory import MemoryTier
from kvstore.tiers.namespace_catalog import NamespaceCatalog
from kvstore.tiers.store_encoded import EncodedPuts
from kvstore.tiers.store_picker import TierPicker
from kvstore.tiers.store_types import LookupResult, StoreConfig, StoreStats

__all__ = ["LookupResult", "StoreConfig", "StoreStats", "TieredStore"]
from kvstore.tiers.tier_codecs import CodecChoice, TierCodecs
from kvstore.tiers.writer import BackgroundWriter, WriteJob

Clock = Callable[[], float]
log = logging.getLogger(__name__)


class TieredStore:
    """Chunks across an ordered list of tiers, with leases and a prefix index.

    Invariants: a key's bit for tier i is set in the index only while tier i
    holds it (or, for shared tiers, while this store believes so: a stale bit
    costs one miss and is then cleared); every pin the store takes belongs to
    a lease or a queued write job and is given back exactly once; background
    work is bounded by ``queue_depth``.
    """

    def __init__(
        self,
        tiers: Sequence[Tier],
        config: StoreConfig = StoreConfig(),
        clock: Clock = time.monotonic,
        events: EventSink | None = None,
        catalog: NamespaceCatalog | None = None,
    ) -> None:
        if not tiers:
            raise InvalidInput("a store needs at least one tier")
        if len(tiers) > MAX_TIERS:
            raise InvalidInput(f"at most {MAX_TIERS} tiers")
        if not isinstance(tiers[0], MemoryTier):
            raise InvalidInput("the first tier must be an in-memory tier (cpu or gpu)")
        if len({t.name for t in tiers}) != len(tiers):
            raise InvalidInput("tier names must be unique")
        self.config = config
        self.tiers: list[Tier] = list(tiers)
        self.top: MemoryTier = tiers[0]
        self._events = events
        self._clock = clock
        self._shared = [i for i, t in enumerate(self.tiers) if t.shared]
        self.index = PrefixIndex()
        self._picker = TierPicker(self.tiers, self.index)
        self.chunk_caches = ChunkCacheIndex()
        self.leases = LeaseTable(clock, config.lease_ttl_s, config.max_leases)
        self._namespaces: dict[NamespaceId, Namespace] = {}
        self._catalog = catalog
        if catalog is not None:
            for known in catalog.load():
                self._namespaces[known.id] = known
        self._lock = threading.Lock()
        self._counts = {
            k: 0 for k in ("lookups", "qchunks", "hchunks", "gets", "hits", "misses", "promotions", "decode_errors")
        }
        for i, tier in enumerate(self.tiers):
            tier.add_evict_listener(self._evict_listener(i))
            if not tier.shared:  # a persistent tier reopened with chunks: index what it holds
                for key in tier.keys():
                    self.index.add(key, i)
        unknown = set(config.codecs) - {t.name for t in self.tiers[1:]}
        if unknown:
            raise InvalidInput(f"codecs name tiers that are not below the top tier: {sorted(unknown)}")
        self.codecs = TierCodecs(config.codecs)
        self.encoded = EncodedPuts(self)  # containers stored as they arrived (store_encoded.py)
        self._writer = BackgroundWriter(
            self.tiers, self._stored, config.queue_depth, config.queue_timeout_s, self._prepare
        )
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="kvstore-reaper", daemon=True)
        self._reaper.start()
        self._closed = False

    # -- namespaces ------------------------------------------------------------------------
    def register_namespace(self, ns: Namespace) -> NamespaceId:
        """Make a namespace usable (idempotent; returns its id) and record a new one in the
        catalog, if any, so it is known after a restart; an unwritable catalog is logged only.

        Raises:
            CapacityError: the catalog is full (the namespace is not registered).
        """
        if ns.id not in self._namespaces and self._catalog is not None:
            try:
                self._catalog.record(ns)
            except OSError as exc:
                log.warning("namespace of tenant %r not recorded in the catalog: %s", ns.tenant, exc)
        self._namespaces[ns.id] = ns
        return ns.id

    def namespace(self, ns_id: NamespaceId) -> Namespace:
        """The registered namespace with this id.

        Raises:
            UnknownNamespace: never registered.
        """
        try:
            return self._namespaces[ns_id]
        except KeyError:
            raise UnknownNamespace(f"unknown namespace {bytes(ns_id).hex()[:16]}…; register it first") from None

    def namespaces(self) -> list[Namespace]:
        return list(self._namespaces.values())

    def _check(self, ns: Namespace) -> None:
        if ns.id not in self._namespaces:
            raise UnknownNamespace(f"namespace of tenant {ns.tenant!r} is not registered with this store")

    # -- writes ----------------------------------------------------------------------------
    def put(self, ns: Namespace, key: ChunkKey, data: BufferLike, cost: float = 1.0) -> bool:
        """Store one chunk under ``key`` in the top tier now, lower tiers later.

        A tensor or typed array must have the namespace's chunk shape and
        dtype; raw bytes (or a 1-D uint8 array) are stored as given.

        Returns:
            True if the top tier holds the chunk, False if it could not take it
            (everything pinned); the rejection is counted.

        Raises:
            UnknownNamespace, ShapeMismatch, DTypeMismatch, ChunkTooLarge, InvalidInput.
        """
        self._check(ns)
        if len(key) != 32:
            raise InvalidInput(f"chunk keys are 32 bytes, got {len(key)}")
        if not is_raw(data):
            check_chunk(ns.spec, ns.chunk_tokens, data)
        return self._put_bytes(ns, key, as_u8(data), cost)

    def put_prefix(
        self, ns: Namespace, tokens: TokenInput, chunks: Sequence[BufferLike], cost: float = 1.0
    ) -> int:
        """Store the KV of a token sequence's full chunks under their prefix keys.

        ``chunks[i]`` holds the KV of tokens ``[i*C, (i+1)*C)``; there may be
        fewer chunks than full chunks in ``tokens`` (the rest is not stored).
        Chunks already present are skipped. Returns how many were stored.

        Raises:
            InvalidInput: more chunks than full chunks in ``tokens``, or bad tokens.
            ShapeMismatch, DTypeMismatch: a chunk does not match the spec.
        """
        self._check(ns)
        keys = list(iter_prefix_keys(ns, tokens))
        if len(chunks) > len(keys):
            raise InvalidInput(f"{len(chunks)} chunks given for {len(keys)} full chunks of tokens")
        for chunk in chunks:
            check_chunk(ns.spec, ns.chunk_tokens, chunk)
        stored = 0
        for key, chunk in zip(keys, chunks):
            if self.index.where(key) & 1:
                continue
            stored += self._put_bytes(ns, key, as_u8(chunk), cost)
        return stored

    def put_chunk_cache(
        self, ns: Namespace, tokens: TokenInput, data: BufferLike, start_position: int = 0, cost: float = 1.0
    ) -> ChunkKey:
        """Store a passage's KV under its content key (position-independent).

        ``data`` holds ``len(tokens)`` tokens of KV computed at positions
        ``start_position ..``. Returns the content key.
        """
        self._check(ns)
        key = content_key(ns, tokens)
        n = len(tokens)
        check_chunk(ns.spec, n, data)
        if start_position < 0:
            raise InvalidInput("start_position must be >= 0")
        if self._put_bytes(ns, key, as_u8(data), cost):
            self.chunk_caches.add(ChunkCacheEntry(key, n, start_position))
        return key

    def _put_bytes(self, ns: Namespace, key: ChunkKey, data: U8, cost: float) -> bool:
        if data.size > self.config.max_chunk_bytes:
            raise ChunkTooLarge(f"chunk of {data.size} bytes exceeds max_chunk_bytes {self.config.max_chunk_bytes}")
        if data.size > self.top.capacity_bytes:
            raise ChunkTooLarge(f"chunk of {data.size} bytes exceeds the top tier's budget {self.top.capacity_bytes}")
        if data.size == 0:
            raise InvalidInput("empty chunk")
        meta = ChunkMeta(ns.id, int(data.size), b"", cost)
        if not self.top.put(key, data, meta):
            # the top tier is full of pinned chunks; if queued lower-tier writes hold
            # those pins, wait (bounded) for them: this is the queue's backpressure
            if not self._writer.pending or not self._writer.wait_idle(self.config.queue_timeout_s):
                return False
            if not self.top.put(key, data, meta):
                return False
        self._admitted(key, self.top.meta(key) or meta)
        return True

    def commit_reserved(self, ns: Namespace, key: ChunkKey, extent: Extent, meta: ChunkMeta) -> bool:
        """Make a filled top-tier reservation (``top.reserve``) visible, as :meth:`put` does.

        For callers that fill the arena themselves (the data plane receives
        payloads straight into it). ``meta`` carries the verified checksum.
        Returns False if the key is held by another namespace (the extent is
        given back either way when not used).
        """
        self._check(ns)
        if meta.namespace != ns.id:
            raise InvalidInput("meta names another namespace")
        if not self.top.commit(key, extent, meta):
            return False
        self._admitted(key, self.top.meta(key) or meta)
        return True

    def _admitted(self, key: ChunkKey, meta: ChunkMeta) -> None:
        """A chunk entered the top tier: index it, announce it, queue its write-through."""
        self._stored(key, meta, 0)
        if self.config.write_mode == "write_through" and len(self.tiers) > 1:
            self._writer.submit(WriteJob(key, meta, list(range(1, len(self.tiers))), source=self.top))

    def set_codec(self, ns: Namespace, tier: str, codec: str, params: CodecParams | None = None) -> None:
        """Choose the codec ``ns``'s chunks get in an encoded tier (one named in ``StoreConfig.codecs``).

        Raises:
            UnknownNamespace, UnknownName (codec), InvalidInput (a raw tier or bad params).
        """
        self._check(ns)
        self.codecs.set(ns.id, tier, CodecChoice(codec, dict(params or {})))

    def _prepare(
        self, key: ChunkKey, meta: ChunkMeta, tier: int, data: U8, is_container: bool = False
    ) -> tuple[U8, ChunkMeta] | None:
        """What tier number ``tier`` stores for a chunk: its raw bytes or its codec container
        (``is_container``: ``data`` is a container, see :meth:`EncodedPuts.prepare`)."""
        name = self.tiers[tier].name
        if is_container:
            return self.encoded.prepare(key, meta, name, data)
        if not self.codecs.encoded(name):
            return data, meta
        ns = self._namespaces.get(meta.namespace)
        if ns is None:
            return None
        encoded = self.codecs.encode(ns, name, data)
        if encoded is None:
            return data, meta
        return encoded, ChunkMeta(ns.id, int(encoded.size), b"", meta.cost)

    def _stored(self, key: ChunkKey, meta: ChunkMeta, tier: int) -> None:
        self.index.add(key, tier)
        if self._events is not None:
            self._events.emit(StoreEvent("stored", self.tiers[tier].name, meta.namespace, key))

    def _evict_listener(self, tier: int) -> Callable[[ChunkKey, ChunkMeta, U8 | None], None]:
        def on_evict(key: ChunkKey, meta: ChunkMeta, data: U8 | None) -> None:
            self._removed(key, meta.namespace, tier)
            lower = list(range(tier + 1, len(self.tiers)))
            if self.config.write_mode == "write_back" and lower and data is not None and not self._closed:
                # the bytes are valid only during this call: the job owns a copy
                encoded = self.codecs.encoded(self.tiers[tier].name)
                self._writer.submit(WriteJob(key, meta, lower, data=np.array(data), encoded=encoded), block=False)

        return on_evict

    def _removed(self, key: ChunkKey, namespace: NamespaceId | None, tier: int) -> None:
        self.index.discard(key, tier)
        if key not in self.index:
            self.chunk_caches.discard(key)
            self.encoded.discard(key)
        if self._events is not None:
            self._events.emit(StoreEvent("removed", self.tiers[tier].name, namespace, key))

    # -- lookups ---------------------------------------------------------------------------
    def lookup(self, ns: Namespace, tokens: TokenInput, lease: bool = True, ttl_s: float | None = None) -> LookupResult:
        """The longest cached prefix of ``tokens`` in any tier; pins the hits under a lease.

        Hashing stops at the first chunk no local tier holds; shared (remote)
        tiers are then asked about the remaining chunks in one batch.
        """
        self._check(ns)
        arr = as_token_array(tokens)
        return self._lookup(ns, iter_prefix_keys(ns, arr), arr.size // ns.chunk_tokens, lease, ttl_s)

    def lookup_keys(
        self, ns: Namespace, keys: Sequence[ChunkKey], lease: bool = True, ttl_s: float | None = None
    ) -> LookupResult:
        """Like :meth:`lookup` for keys the caller computed (engine-provided hashes).

        Caller-supplied keys could name another namespace's chunks, so each hit
        is checked to belong to ``ns``; the prefix ends at the first that does not.
        """
        self._check(ns)
        return self._lookup(ns, (k for k in keys if self._picker.belongs(ns.id, k)), len(keys), lease, ttl_s)

    def _lookup(
        self, ns: Namespace, keys_it: Iterator[ChunkKey], query_chunks: int, lease: bool, ttl_s: float | None
    ) -> LookupResult:
        self.leases.expire()
        hit = self.index.longest_prefix(keys_it)
        found, masks = hit.keys, hit.locations
        if hit.missed is not None and self._shared:
            self._extend_from_shared([hit.missed, *keys_it], found, masks)
        pins: dict[ChunkKey, Tier] = {}
        if lease and found:
            keep = self._picker.pin_hits(found, masks, pins)
            found, masks = found[:keep], masks[:keep]
        if masks and masks.count(masks[0]) == len(masks):  # the common case: all in one place
            names = [self._picker.fastest_name(masks[0])] * len(masks)
        else:
            names = [self._picker.fastest_name(m) for m in masks]
        lease_id = self.leases.grant(pins, ttl_s) if lease and pins else None
        with self._lock:
            c = self._counts
            c["lookups"] += 1
            c["qchunks"] += query_chunks
            c["hchunks"] += len(found)
        return LookupResult(len(found) * ns.chunk_tokens, tuple(found), tuple(names), query_chunks, lease_id)

    def _extend_from_shared(self, rest: list[ChunkKey], found: list[ChunkKey], masks: list[int]) -> None:
        """Ask the first shared tier how many of ``rest`` it holds, from the first."""
        if not rest:
            return
        i = self._shared[0]
        n = self.tiers[i].count_leading(rest)
        found.extend(rest[:n])
        masks.extend([1 << i] * n)

    def lookup_chunk_caches(self, ns: Namespace, passages: Sequence[TokenInput]) -> list[ChunkCacheEntry | None]:
        """The stored chunk-cache of each passage (None where absent), at any position."""
        self._check(ns)
        return self.chunk_caches.find([content_key(ns, p) for p in passages])

    # -- reads -----------------------------------------------------------------------------
    def get(self, ns: Namespace, key: ChunkKey, out: BufferLike, lease: LeaseId | None = None) -> int | None:
        """Copy a chunk into ``out`` (a caller-owned buffer); returns its size, or None on a miss.

        With a lease from :meth:`lookup`, the chunk is read from the tier the
        lease pinned and the lease's pin on it is released (the get consumes
        it). A corrupt or vanished copy in one tier is a counted miss there and
        the next tier is tried. A hit below the top tier is promoted.
        """
        self._check(ns)
        dst = as_u8(out, writable=True)
        n = self._read(ns, key, dst, lease)
        with self._lock:
            self._counts["gets"] += 1
            self._counts["hits" if n is not None else "misses"] += 1
        return n

    def get_many(
        self, ns: Namespace, keys: Sequence[ChunkKey], outs: Sequence[BufferLike], lease: LeaseId | None = None
    ) -> list[int | None]:
        """:meth:`get` for each key into the matching buffer."""
        if len(keys) != len(outs):
            raise InvalidInput(f"{len(keys)} keys but {len(outs)} output buffers")
        return [self.get(ns, k, o, lease) for k, o in zip(keys, outs)]

    def _read(self, ns: Namespace, key: ChunkKey, out: U8, lease: LeaseId | None) -> int | None:
        if lease is not None:
            tier = self.leases.tier_of(lease, key)
            if tier is not None:
                try:
                    n = self._tier_get(tier, key, out, ns, pinned=True)
                finally:
                    self.leases.consume(lease, key)
                if n is not None:
                    self._promote(ns, key, out, n, self.tiers.index(tier))
                    return n
        mask = self.index.where(key)
        order = tiers_of(mask) + [i for i, t in enumerate(self.tiers) if t.shared and not mask >> i & 1]
        for i in order:
            tier = self.tiers[i]
            n = self._tier_get(tier, key, out, ns, pinned=False)
            if n is not None:
                if not mask >> i & 1:
                    self.index.add(key, i)
                self._promote(ns, key, out, n, i)
                return n
            if mask >> i & 1 and not tier.contains(key):
                self.index.discard(key, i)
        return None

    def _tier_get(self, tier: Tier, key: ChunkKey, out: U8, ns: Namespace, pinned: bool) -> int | None:
        """Read ``key`` from one tier into ``out``, decoding a codec container; None on a miss."""
        encoded = self.codecs.encoded(tier.name)
        dst = out
        if encoded and tier.shared:  # one round trip: the container and its header together
            got = tier.read(key)
            if got is None or got[1].namespace != ns.id:
                return None
            dst, n = got[0], got[1].nbytes
        else:
            if encoded:  # local tiers know the container's size without reading it
                meta = tier.meta(key)
                dst = np.empty(meta.nbytes if meta is not None else 0, dtype=np.uint8)
            if pinned and isinstance(tier, MemoryTier):
                found = tier.get_pinned_into(key, dst, ns.id)
            else:
                found = tier.get_into(key, dst, ns.id)
            if found is None or not encoded:
                return found
            n = found
        try:
            decoded = self.codecs.decode_into(ns, dst[:n], out)
            if not self.encoded.verify(key, out[:decoded]):
                raise CodecError("decoded bytes fail the chunk's checksum")
            return decoded
        except CodecError:
            log.warning("tier %s holds an undecodable container; dropping it", tier.name)
            with self._lock:
                self._counts["decode_errors"] += 1
            tier.delete(key)
            return None

    def _promote(self, ns: Namespace, key: ChunkKey, out: U8, n: int, tier: int) -> None:
        if tier == 0 or not self.config.promote_on_hit:
            return
        if self.top.put(key, out[:n], ChunkMeta(ns.id, n, b"")):
            self._stored(key, self.top.meta(key) or ChunkMeta(ns.id, n, b""), 0)
            with self._lock:
                self._counts["promotions"] += 1

    def contains(self, ns: Namespace, key: ChunkKey) -> bool:
        self._check(ns)
        return bool(self.index.where(key)) or any(t.shared and t.contains(key) for t in self.tiers)

    # -- deletes, leases -------------------------------------------------------------------
    def delete(self, ns: Namespace, key: ChunkKey) -> bool:
        """Remove a chunk from every tier; True if any held it."""
        self._check(ns)
        found = False
        for i, tier in enumerate(self.tiers):
            meta = tier.meta(key)
            if meta is not None and meta.namespace != ns.id:
                continue  # another namespace's chunk: not ours to delete
            if tier.delete(key):
                found = True
                self._removed(key, ns.id, i)
        return found

    def clear(self, ns: Namespace) -> int:
        """Remove every chunk of one namespace from every tier; returns chunks removed."""
        self._check(ns)
        removed = 0
        for i, tier in enumerate(self.tiers):
            for key in list(tier.keys(ns.id)):
                if tier.delete(key):
                    removed += 1
                    self.index.discard(key, i)
                    if key not in self.index:
                        self.chunk_caches.discard(key)
                        self.encoded.discard(key)
            if self._events is not None:
                self._events.emit(StoreEvent("cleared", tier.name, ns.id))
        return removed

    def pin(self, ns: Namespace, keys: Sequence[ChunkKey], ttl_s: float | None = None) -> LeaseId | None:
        """Pin chunks (in their fastest local tier) under a new lease; None if none could be pinned."""
        self._check(ns)
        pins: dict[ChunkKey, Tier] = {}
        for key in keys:
            if not self._picker.belongs(ns.id, key):
                continue
            tier = self._picker.pin_fastest(key, self.index.where(key))
            if tier is not None:
                pins[key] = tier
        return self.leases.grant(pins, ttl_s) if pins else None

    def release(self, lease: LeaseId) -> bool:
        """Give back a lease's pins; harmless if already released or expired."""
        return self.leases.release(lease)

    # -- lifecycle, stats ------------------------------------------------------------------
    def flush(self) -> None:
        """Wait for queued background writes."""
        self._writer.flush()

    def write_queue_depth(self) -> int:
        """Jobs waiting in the background writer for the lower tiers."""
        return self._writer.stats().depth

    def writes_pending(self) -> int:
        """Lower-tier writes queued or running; each pins its chunk in the top tier until it is done."""
        return int(self._writer.pending)

    def stats(self) -> StoreStats:
        with self._lock:
            c = dict(self._counts)
        return StoreStats(
            tiers=tuple(t.stats() for t in self.tiers),
            leases=self.leases.stats(),
            writer=self._writer.stats(),
            lookups=c["lookups"],
            lookup_query_chunks=c["qchunks"],
            lookup_hit_chunks=c["hchunks"],
            gets=c["gets"],
            get_hits=c["hits"],
            get_misses=c["misses"],
            promotions=c["promotions"],
            decode_errors=c["decode_errors"],
            namespaces=len(self._namespaces),
            index_entries=len(self.index),
        )

    def close(self) -> None:
        """Flush background writes, release leases, stop threads, close tiers; idempotent."""
        if self._closed:
            return
        self._writer.close()
        self._closed = True
        self._stop.set()
        self._reaper.join()
        self.leases.release_all()
        for tier in reversed(self.tiers):
            tier.close()

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reap(self) -> None:
        while not self._stop.wait(self.config.reaper_interval_s):
            self.leases.expire()
