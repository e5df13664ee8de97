"""What the data plane needs from the tiered store, namespace-checked.

The store indexes chunks by key alone, and a key is public data once a
client has seen it; so every key-based operation here first checks that the
chunk belongs to the caller's namespace, and a chunk of another namespace
answers exactly like an absent one (a tenant learns nothing about another's
chunks).

A filled CPU-arena reservation becomes visible through
``TieredStore.commit_reserved`` (index, events, write-through, like ``put``),
and ``MemoryTier.locate(key, namespace)`` pins only a chunk of that namespace,
under the tier's lock.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvstore.buffers import U8
from kvstore.codecs.container import unpack
from kvstore.errors import CodecError, UnknownNamespace
from kvstore.keys import ChunkKey, Namespace, NamespaceId
from kvstore.tiers.arena import Extent
from kvstore.tiers.base import ChunkMeta
from kvstore.tiers.cpu import CPUTier
from kvstore.tiers.leases import LeaseId
from kvstore.tiers.store import TieredStore


class StoreAccess:
    """The store as the data plane uses it: namespace checks, reservations, pins.

    Invariant: every pin :meth:`locate` takes is given back with exactly one
    :meth:`unpin` by its holder (the connection's session); every extent
    :meth:`reserve` hands out is either committed or aborted once.
    """

    def __init__(self, store: TieredStore) -> None:
        self.store = store
        self.top = store.top
        self.arena: CPUTier | None = store.top if isinstance(store.top, CPUTier) else None
        self.layered = len(store.tiers) > 1  # a lower tier exists: some calls may block
        self.remote = any(t.shared for t in store.tiers)  # lookups may ask the network

    # -- namespaces --------------------------------------------------------------------
    def namespace(self, ns_id: bytes, tenant: str | None) -> Namespace:
        """The registered namespace ``ns_id``; with ``tenant``, only one of that tenant.

        Raises:
            UnknownNamespace: never registered, or another tenant's (the same message).
        """
        try:
            ns = self.store.namespace(NamespaceId(ns_id))
        except UnknownNamespace:
            ns = None
        if ns is None or (tenant is not None and ns.tenant != tenant):
            raise UnknownNamespace(f"unknown namespace {ns_id.hex()[:16]}…; register it first")
        return ns

    def owner(self, key: ChunkKey, local_only: bool = False) -> NamespaceId | None:
        """The namespace of the fastest stored copy of ``key``, or None if no tier holds it."""
        for tier in self.store.tiers:
            if local_only and tier.shared:
                continue
            meta = tier.meta(key)
            if meta is not None:
                return meta.namespace
        return None

    def owned(self, ns: Namespace, key: ChunkKey) -> bool:
        return self.owner(key) == ns.id

    def owned_prefix(self, ns: Namespace, keys: Sequence[ChunkKey]) -> int:
        """How many of ``keys``, from the first, are stored under ``ns`` (checked fastest tier first)."""
        top_meta = self.top.meta
        for i, key in enumerate(keys):
            meta = top_meta(key)
            owner = meta.namespace if meta is not None else self.owner(key)
            if owner != ns.id:
                return i
        return len(keys)

    # -- reads -------------------------------------------------------------------------
    def locate(self, ns: Namespace, key: ChunkKey) -> Extent | None:
        """Pin ``key`` in the top tier if it holds it under ``ns``; its arena extent, or None."""
        return self.top.locate(key, ns.id)

    def unpin(self, key: ChunkKey) -> None:
        self.top.unpin(key)

    def view(self, extent: Extent) -> U8:
        """Read-only bytes of a located (pinned) extent in the CPU arena."""
        region = self.region(extent)
        region.flags.writeable = False
        return region

    def checksum_of(self, key: ChunkKey) -> bytes:
        return self.top.checksum(key)

    def lower_size(self, ns: Namespace, key: ChunkKey) -> int | None:
        """Bytes to hold ``key``'s chunk (stored under ``ns`` in any tier) once read, or None. Blocking.

        A tier that keeps codec containers knows only the encoded size; the
        decoded size is read from the container's header (shim for a
        ``TieredStore.chunk_size(ns, key)``).
        """
        for tier in self.store.tiers:
            meta = tier.meta(key)
            if meta is None:
                continue
            if meta.namespace != ns.id:
                return None
            if not self.store.codecs.encoded(tier.name):
                return meta.nbytes
            got = tier.read(key)
            if got is None:
                return None
            try:
                return unpack(got[0], verify=False).layout.nbytes
            except CodecError:
                return None
        return None

    def read_lower(self, ns: Namespace, key: ChunkKey, lease: LeaseId | None) -> U8 | None:
        """A copy of a chunk the top tier lacks, read (and promoted) through the store. Blocking."""
        size = self.lower_size(ns, key)
        if size is None:
            return None
        out = np.empty(size, dtype=np.uint8)
        n = self.store.get(ns, key, out, lease)
        return None if n is None else out[:n]

    # -- writes ------------------------------------------------------------------------
    def write_queue_full(self) -> bool:
        """Whether the write-through queue to the lower tiers is full (a slow lower tier).

        A commit would wait on it (write-through mode only: write-back
        demotions never block a put); the data plane bounds that wait per PUT
        and answers BUSY past it (backpressure).
        """
        if not self.layered or self.store.config.write_mode != "write_through":
            return False
        return self.store.write_queue_depth() >= self.store.config.queue_depth

    def reserve(self, nbytes: int) -> Extent | None:
        return self.top.reserve(nbytes)

    def writes_pending(self) -> bool:
        """Lower-tier writes still pin chunks in the top tier (their room comes back when they finish)."""
        return self.store.writes_pending() > 0

    def region(self, extent: Extent) -> U8:
        if self.arena is None:
            raise RuntimeError("the top tier has no host arena")  # callers check .arena first
        return self.arena.region(extent)

    def abort(self, extent: Extent) -> None:
        self.top.abort(extent)

    def commit(
        self, ns: Namespace, key: ChunkKey, extent: Extent, nbytes: int, digest: bytes, cost: float
    ) -> bool:
        """Make a filled, verified reservation visible under ``key`` (index, write-through); blocking.

        A key already stored under another namespace is left alone (the
        extent is given back) and reported as stored, as for any present key.
        """
        meta = ChunkMeta(ns.id, nbytes, digest, cost)
        present = self.top.meta(key)
        if present is not None and present.namespace != ns.id:
            self.top.abort(extent)
            return True
        return self.store.commit_reserved(ns, key, extent, meta)

    def put_copy(self, ns: Namespace, key: ChunkKey, data: U8, cost: float) -> bool:
        """Store bytes through ``TieredStore.put`` (the path for a top tier without a host arena)."""
        present = self.owner(key, local_only=True)
        if present is not None and present != ns.id:
            return True
        return self.store.put(ns, key, data, cost)

    def delete(self, ns: Namespace, key: ChunkKey) -> bool:
        return self.owned(ns, key) and self.store.delete(ns, key)

    def list_keys(self, ns: Namespace, limit: int) -> tuple[list[ChunkKey], bool]:
        """Up to ``limit`` keys of ``ns`` in the local tiers; and whether more exist."""
        seen: dict[ChunkKey, None] = {}
        for tier in self.store.tiers:
            if tier.shared:
                continue
            for key in tier.keys(ns.id):
                if len(seen) >= limit and key not in seen:
                    return list(seen), True
                seen[key] = None
        return list(seen), False
