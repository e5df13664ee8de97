"""The tier interface every storage place implements, and its registry.

A tier stores opaque chunk bytes under 32-byte keys within a byte budget.
It owns its memory: only the tier's own code allocates, pins, frees or
evicts. The tiered store (store.py) composes tiers; it never edits a tier's
counts.
"""

from __future__ import annotations

import enum
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

from kvstore.buffers import U8
from kvstore.errors import InvalidInput, UnknownName
from kvstore.keys import ChunkKey, NamespaceId


class MissReason(str, enum.Enum):
    """Why a read found nothing; counted per tier and exported as a metric label."""

    ABSENT = "absent"  # never stored here
    EVICTED = "evicted"  # was here, evicted by the budget
    EXPIRED = "expired"  # a TTL or lease ran out
    CORRUPT = "corrupt"  # failed its checksum, truncated, or named another key
    REMOTE_DOWN = "remote_down"  # the remote tier could not be reached
    TOO_SMALL = "too_small"  # the caller's output buffer was smaller than the chunk


@dataclass(frozen=True, slots=True)
class ChunkMeta:
    """What a tier keeps about a chunk besides its bytes.

    ``checksum`` is the XXH3-128 of the stored bytes; ``cost`` is the relative
    cost of recomputing the chunk per byte (used by the cost-aware policy).
    """

    namespace: NamespaceId
    nbytes: int
    checksum: bytes
    cost: float = 1.0


@dataclass(slots=True)
class TierStats:
    """Counters of one tier. Mutated only by the owning tier under its lock."""

    name: str
    capacity_bytes: int
    used_bytes: int = 0
    entries: int = 0
    puts: int = 0
    put_bytes: int = 0
    hits: int = 0
    hit_bytes: int = 0
    evictions: int = 0
    rejected: int = 0  # puts refused (too large, all pinned, disk full, remote down)
    misses: dict[str, int] = field(default_factory=lambda: {r.value: 0 for r in MissReason})

    def miss(self, reason: MissReason) -> None:
        self.misses[reason.value] += 1

    def snapshot(self) -> "TierStats":
        copy = TierStats(**{f: getattr(self, f) for f in self.__slots__ if f != "misses"})
        copy.misses = dict(self.misses)
        return copy


EvictListener = Callable[[ChunkKey, ChunkMeta, U8 | None], None]
"""Called by a tier for each chunk it evicts: key, meta, and the bytes while
they are still readable (write-back demotion copies them), or None."""


class Tier(ABC):
    """A place chunks live, with a byte budget.

    Invariants every implementation keeps:
      * ``used_bytes <= capacity_bytes`` at all times;
      * a pinned chunk is never evicted; pins are counted per key and a count
        never goes below zero (unpinning an unpinned key raises);
      * a read never hands out bytes that fail their checksum where the tier
        verifies (disk, remote): it counts a CORRUPT miss instead.
    """

    kind: ClassVar[str]
    #: True when other processes may write it (remote): lookups must ask it
    shared: ClassVar[bool] = False

    def __init__(self, name: str, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise InvalidInput(f"tier {name!r} needs a positive byte budget")
        self.name = name
        self._stats = TierStats(name=name, capacity_bytes=capacity_bytes)
        self._lock = threading.RLock()
        self._evict_listeners: list[EvictListener] = []

    def add_evict_listener(self, listener: EvictListener) -> None:
        self._evict_listeners.append(listener)

    def _notify_evicted(self, key: ChunkKey, meta: ChunkMeta, data: U8 | None) -> None:
        for listener in self._evict_listeners:
            listener(key, meta, data)

    @property
    def capacity_bytes(self) -> int:
        return self._stats.capacity_bytes

    def stats(self) -> TierStats:
        with self._lock:
            return self._stats.snapshot()

    @abstractmethod
    def put(self, key: ChunkKey, data: U8, meta: ChunkMeta) -> bool:
        """Store a copy of ``data`` under ``key``, evicting unpinned chunks if needed.

        Returns True if stored, False if it could not be (counted in
        ``rejected``: too large for the budget, all pinned, a remote down).
        Storing a key that is already present replaces it.
        """

    @abstractmethod
    def get_into(self, key: ChunkKey, out: U8, namespace: NamespaceId | None = None) -> int | None:
        """Copy the chunk into ``out[:n]`` and return n, or None on a miss (counted).

        With ``namespace``, a chunk stored under another namespace is a miss
        (``absent``) and nothing is copied: one tenant never reads another's KV.
        """

    @abstractmethod
    def read(self, key: ChunkKey) -> tuple[U8, ChunkMeta] | None:
        """A verified copy of the chunk and its meta, or None on a miss (counted)."""

    @abstractmethod
    def meta(self, key: ChunkKey) -> ChunkMeta | None:
        """The chunk's meta without reading its bytes, or None if absent."""

    def contains(self, key: ChunkKey) -> bool:
        return self.meta(key) is not None

    def count_leading(self, keys: list[ChunkKey]) -> int:
        """How many of ``keys``, from the first, are present (remote tiers batch this)."""
        return leading(keys, self.contains)

    @abstractmethod
    def delete(self, key: ChunkKey) -> bool:
        """Remove the chunk; True if it was present. A pinned chunk is removed when unpinned."""

    @abstractmethod
    def keys(self, namespace: NamespaceId | None = None) -> Iterator[ChunkKey]:
        """Keys held (of one namespace, or all); a snapshot, safe to iterate."""

    def pin(self, key: ChunkKey) -> bool:
        """Protect a present chunk from eviction; False if absent. Local tiers override."""
        return self.contains(key)

    def pin_many(self, keys: list[ChunkKey]) -> list[bool]:
        """:meth:`pin` each key; local tiers do it under one lock acquisition."""
        return [self.pin(key) for key in keys]

    def unpin(self, key: ChunkKey) -> None:
        """Release one pin taken by :meth:`pin`."""

    def clear(self, namespace: NamespaceId | None = None) -> int:
        """Delete every chunk (of one namespace); returns how many."""
        n = 0
        for key in list(self.keys(namespace)):
            n += self.delete(key)
        return n

    def close(self) -> None:
        """Release the tier's resources; idempotent."""


TierFactory = Callable[..., Tier]
_TIERS: dict[str, TierFactory] = {}


def register_tier(kind: str, factory: TierFactory) -> None:
    if kind in _TIERS:
        raise InvalidInput(f"tier kind {kind!r} is already registered")
    _TIERS[kind] = factory


def tier_factory(kind: str) -> TierFactory:
    try:
        return _TIERS[kind]
    except KeyError:
        raise UnknownName(f"unknown tier kind {kind!r}; known: {sorted(_TIERS)}") from None


def leading(keys: Iterable[ChunkKey], present: Callable[[ChunkKey], bool]) -> int:
    """Length of the run of keys, from the first, for which ``present`` holds."""
    n = 0
    for key in keys:
        if not present(key):
            break
        n += 1
    return n
