"""The common core of the in-memory tiers (CPU and GPU): entries in one arena.

The tier is the single owner of its arena's allocator, its entries' pin
counts and its eviction policy; nothing else changes them. Copies into and
out of the arena run outside the tier's lock: an extent being filled is not
yet visible, and an extent being read is pinned, so it cannot be evicted or
freed underneath the copy.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np

from kvstore.buffers import U8
from kvstore.errors import InvalidInput, LeaseError
from kvstore.keys import ChunkKey, NamespaceId
from kvstore.tiers.arena import Extent, ExtentAllocator
from kvstore.tiers.base import ChunkMeta, MissReason, Tier
from kvstore.tiers.policies import EvictionPolicy

Clock = Callable[[], float]


class _Entry:
    """One stored chunk: where it lives, its meta, and how many holders pin it."""

    __slots__ = ("extent", "meta", "pins")

    def __init__(self, extent: Extent, meta: ChunkMeta) -> None:
        self.extent = extent
        self.meta = meta
        self.pins = 0


class MemoryTier(Tier):
    """Chunks in one arena with a byte budget and a pluggable eviction policy.

    Invariants: ``used_bytes`` is the sum of the extent sizes of the live
    entries, the zombies and open reservations, and is at most ``capacity_bytes``; an entry with
    ``pins > 0`` is never evicted or freed; every extent belongs to exactly one
    entry or is free. A chunk deleted while pinned becomes a *zombie*: invisible
    to lookups and plain reads, still readable by its pin holders
    (:meth:`get_pinned_into`), freed when its last pin goes. Unpinning a key
    gives back a zombie's pin first (pins taken before the delete).
    """

    def __init__(
        self,
        name: str,
        capacity_bytes: int,
        policy: EvictionPolicy,
        alignment: int,
        max_chunk_bytes: int | None,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(name, capacity_bytes)
        self._alloc = ExtentAllocator(capacity_bytes, alignment)
        self._stats.capacity_bytes = self._alloc.capacity
        self._policy = policy
        self._entries: dict[ChunkKey, _Entry] = {}
        self._zombies: dict[ChunkKey, list[_Entry]] = {}
        self._evicted_recently: dict[ChunkKey, MissReason] = {}
        self._max_chunk = max_chunk_bytes or self._alloc.capacity
        self._clock = clock

    # -- the copies a concrete tier provides -------------------------------------------
    @abstractmethod
    def _copy_in(self, extent: Extent, data: U8) -> bytes:
        """Copy ``data`` into the extent; return its checksum (or b"" if not computed)."""

    @abstractmethod
    def _copy_out(self, extent: Extent, nbytes: int, out: U8) -> None:
        """Copy the first ``nbytes`` of the extent into ``out``."""

    def _hash(self, extent: Extent, nbytes: int) -> bytes:
        """XXH3-128 of an extent's first ``nbytes`` (host tiers override; b"" where not possible)."""
        return b""

    def checksum(self, key: ChunkKey) -> bytes:
        """The chunk's checksum, computed now (once, under a pin) if the put left it for later.

        Returns b"" if the chunk is absent or the tier cannot hash it.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return b""
            if entry.meta.checksum:
                return entry.meta.checksum
            entry.pins += 1
        try:
            digest = self._hash(entry.extent, entry.meta.nbytes)
        finally:
            self._release(key, entry)
        with self._lock:
            if digest and not entry.meta.checksum:
                entry.meta = replace(entry.meta, checksum=digest)
        return digest

    def _new_host_buffer(self, nbytes: int) -> U8:
        return np.empty(nbytes, dtype=np.uint8)

    @abstractmethod
    def view(self, key: ChunkKey) -> U8 | None:
        """A read-only view of a chunk the caller has pinned, or None if absent."""

    # -- Tier ---------------------------------------------------------------------------
    def put(self, key: ChunkKey, data: U8, meta: ChunkMeta) -> bool:
        nbytes = int(data.size)
        with self._lock:
            self._expire()
            present = self._entries.get(key)
            if present is not None:
                if present.meta.namespace != meta.namespace:
                    self._stats.rejected += 1  # a key of another namespace: never overwrite nor share it
                    return False
                self._policy.touch(key, self._clock())
                return True  # keys name their content: the stored copy is the same chunk
        extent = self.reserve(nbytes)
        if extent is None:
            return False
        try:
            checksum = self._copy_in(extent, data)
        except BaseException:
            self.abort(extent)
            raise
        return self.commit(key, extent, replace(meta, nbytes=nbytes, checksum=checksum or meta.checksum))

    def reserve(self, nbytes: int) -> Extent | None:
        """Allocate room for a chunk that the caller fills before :meth:`commit` (or :meth:`abort`).

        The extent is invisible to readers until committed. Returns None (a
        counted rejection) if nothing evictable frees enough room.

        Raises:
            InvalidInput: larger than the tier's chunk limit.
        """
        if nbytes > self._max_chunk or nbytes <= 0:
            raise InvalidInput(f"chunk of {nbytes} bytes outside tier {self.name!r}'s limit (1..{self._max_chunk})")
        with self._lock:
            self._expire()
            extent = self._allocate(nbytes)
            if extent is None:
                self._stats.rejected += 1
            else:
                self._stats.used_bytes += extent.size
            return extent

    def abort(self, extent: Extent) -> None:
        """Give back a reserved extent that will not be committed."""
        with self._lock:
            self._alloc.free(extent)
            self._stats.used_bytes -= extent.size

    def commit(self, key: ChunkKey, extent: Extent, meta: ChunkMeta) -> bool:
        """Make a filled reservation visible under ``key``; ``meta.nbytes`` bytes of it are the chunk.

        If ``key`` was committed meanwhile, the stored copy is kept and the
        extent given back (keys name their content).
        """
        if not 0 < meta.nbytes <= extent.size:
            self.abort(extent)
            raise InvalidInput(f"commit of {meta.nbytes} bytes into a reservation of {extent.size}")
        with self._lock:
            present = self._entries.get(key)
            if present is not None:
                self._alloc.free(extent)
                self._stats.used_bytes -= extent.size
                return present.meta.namespace == meta.namespace  # another namespace's key: refused
            self._entries[key] = _Entry(extent, meta)
            self._evicted_recently.pop(key, None)
            self._policy.admit(key, meta.nbytes, meta.cost, self._clock())
            s = self._stats
            s.puts += 1
            s.put_bytes += meta.nbytes
            s.entries += 1
        return True

    def locate(self, key: ChunkKey, namespace: NamespaceId | None = None) -> Extent | None:
        """Pin a chunk and return where it lies in the arena (offset, and its ``meta.nbytes``).

        The caller reads the arena directly (e.g. a client mapping it) and
        gives the pin back with :meth:`unpin`. None (a counted miss) if absent,
        or with ``namespace`` if it is another namespace's chunk.
        """
        entry = self._acquire(key, namespace)
        if entry is None:
            return None
        with self._lock:
            self._stats.hits += 1
            self._stats.hit_bytes += entry.meta.nbytes
        return Extent(entry.extent.offset, entry.meta.nbytes)

    def get_into(self, key: ChunkKey, out: U8, namespace: NamespaceId | None = None) -> int | None:
        return self._get_entry_into(key, self._acquire(key, namespace), out)

    def get_pinned_into(self, key: ChunkKey, out: U8, namespace: NamespaceId | None = None) -> int | None:
        """Like :meth:`get_into` for a caller holding a pin: also reads a chunk deleted since."""
        with self._lock:
            zombies = self._zombies.get(key)
            entry = zombies[0] if zombies else None
            if entry is not None:
                entry.pins += 1
        if entry is None:
            entry = self._acquire(key, namespace)
        elif namespace is not None and entry.meta.namespace != namespace:
            self._release(key, entry)
            entry = None
        return self._get_entry_into(key, entry, out)

    def _get_entry_into(self, key: ChunkKey, entry: _Entry | None, out: U8) -> int | None:
        if entry is None:
            return None
        try:
            nbytes = entry.meta.nbytes
            if out.size < nbytes:
                with self._lock:
                    self._stats.miss(MissReason.TOO_SMALL)
                return None
            self._copy_out(entry.extent, nbytes, out)
            with self._lock:
                self._stats.hits += 1
                self._stats.hit_bytes += nbytes
            return nbytes
        finally:
            self._release(key, entry)

    def read(self, key: ChunkKey) -> tuple[U8, ChunkMeta] | None:
        entry = self._acquire(key)
        if entry is None:
            return None
        try:
            out = self._new_host_buffer(entry.meta.nbytes)
            self._copy_out(entry.extent, entry.meta.nbytes, out)
            with self._lock:
                self._stats.hits += 1
                self._stats.hit_bytes += entry.meta.nbytes
            return out, entry.meta
        finally:
            self._release(key, entry)

    def meta(self, key: ChunkKey) -> ChunkMeta | None:
        with self._lock:
            self._expire()
            entry = self._entries.get(key)
            return None if entry is None else entry.meta

    def delete(self, key: ChunkKey) -> bool:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            self._policy.remove(key)
            if entry.pins:
                self._zombies.setdefault(key, []).append(entry)
            else:
                self._free(entry)
            return True

    def keys(self, namespace: NamespaceId | None = None) -> Iterator[ChunkKey]:
        with self._lock:
            snapshot = [
                k
                for k, e in self._entries.items()
                if namespace is None or e.meta.namespace == namespace
            ]
        return iter(snapshot)

    def pin(self, key: ChunkKey) -> bool:
        with self._lock:
            self._expire()
            entry = self._entries.get(key)
            if entry is None:
                return False
            entry.pins += 1
            return True

    def pin_many(self, keys: list[ChunkKey]) -> list[bool]:
        out: list[bool] = []
        with self._lock:
            self._expire()
            get = self._entries.get
            for key in keys:
                entry = get(key)
                if entry is None:
                    out.append(False)
                else:
                    entry.pins += 1
                    out.append(True)
        return out

    def unpin(self, key: ChunkKey) -> None:
        with self._lock:
            zombies = self._zombies.get(key)
            entry = zombies[0] if zombies else self._entries.get(key)
            if entry is None or entry.pins == 0:
                raise LeaseError(f"unpin of a chunk that tier {self.name!r} does not hold pinned")
            self._release_locked(key, entry)

    def pinned_count(self) -> int:
        """Total pins held on this tier's chunks, zombies included (0 when every holder released)."""
        with self._lock:
            live = sum(e.pins for e in self._entries.values())
            return live + sum(e.pins for zs in self._zombies.values() for e in zs)

    def miss_reason(self, key: ChunkKey) -> MissReason:
        """Why ``key`` is not here: evicted/expired recently, or absent."""
        with self._lock:
            return self._evicted_recently.get(key, MissReason.ABSENT)

    # -- internals (call with the lock held unless noted) ---------------------------
    def _acquire(self, key: ChunkKey, namespace: NamespaceId | None = None) -> _Entry | None:
        """Pin a present entry for a read and touch it; count a miss otherwise. Takes the lock."""
        with self._lock:
            self._expire()
            entry = self._entries.get(key)
            if entry is None:
                self._stats.miss(self._evicted_recently.get(key, MissReason.ABSENT))
                return None
            if namespace is not None and entry.meta.namespace != namespace:
                self._stats.miss(MissReason.ABSENT)  # another namespace's chunk: as if absent
                return None
            entry.pins += 1
            self._policy.touch(key, self._clock())
            return entry

    def _release(self, key: ChunkKey, entry: _Entry) -> None:
        with self._lock:
            self._release_locked(key, entry)

    def _release_locked(self, key: ChunkKey, entry: _Entry) -> None:
        entry.pins -= 1
        if entry.pins == 0 and self._entries.get(key) is not entry:  # a zombie's last pin
            zombies = self._zombies[key]
            zombies.remove(entry)
            if not zombies:
                del self._zombies[key]
            self._free(entry)

    def _drop(self, key: ChunkKey, entry: _Entry) -> None:
        del self._entries[key]
        self._policy.remove(key)
        self._free(entry)

    def _free(self, entry: _Entry) -> None:
        self._alloc.free(entry.extent)
        self._stats.used_bytes -= entry.extent.size
        self._stats.entries -= 1

    def _allocate(self, nbytes: int) -> Extent | None:
        extent = self._alloc.allocate(nbytes)
        while extent is None:
            victim = self._policy.victim(self._is_pinned, self._clock())
            if victim is None:
                return None
            self._evict(victim, MissReason.EVICTED)
            extent = self._alloc.allocate(nbytes)
        return extent

    def _is_pinned(self, key: ChunkKey) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.pins > 0

    def _evict(self, key: ChunkKey, reason: MissReason) -> None:
        entry = self._entries[key]
        self._notify_evicted(key, entry.meta, self._peek(entry))
        self._drop(key, entry)
        self._stats.evictions += 1
        self._remember(key, reason)

    def _remember(self, key: ChunkKey, reason: MissReason) -> None:
        self._evicted_recently[key] = reason
        if len(self._evicted_recently) > 65536:  # bounded memory of why keys left
            del self._evicted_recently[next(iter(self._evicted_recently))]

    def _expire(self) -> None:
        for key in self._policy.expired(self._clock()):
            entry = self._entries.get(key)
            if entry is None:
                self._policy.remove(key)
            elif entry.pins == 0:
                self._evict(key, MissReason.EXPIRED)

    @abstractmethod
    def _peek(self, entry: _Entry) -> U8 | None:
        """The entry's bytes for an eviction listener (host tiers), or None."""
