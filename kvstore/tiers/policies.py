"""Eviction policies, chosen by name from a registry.

A policy only orders keys; it never frees memory. The owning tier tells it
what was admitted, touched and removed, and asks it for the next victim,
skipping keys the tier reports as pinned. Time is passed in (seconds from a
monotonic clock) so tests can drive it.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from typing import ClassVar

from kvstore.errors import InvalidInput, UnknownName
from kvstore.keys import ChunkKey

IsPinned = Callable[[ChunkKey], bool]


class EvictionPolicy(ABC):
    """Orders a tier's keys for eviction.

    Invariant: the policy tracks exactly the keys the tier holds; ``remove``
    of an unknown key is harmless (idempotent).
    """

    name: ClassVar[str]

    @abstractmethod
    def admit(self, key: ChunkKey, nbytes: int, cost: float, now: float) -> None:
        """Start tracking a key (re-admitting a tracked key resets it)."""

    @abstractmethod
    def touch(self, key: ChunkKey, now: float) -> None:
        """Record a hit on a tracked key."""

    @abstractmethod
    def remove(self, key: ChunkKey) -> None:
        """Stop tracking a key."""

    @abstractmethod
    def victim(self, is_pinned: IsPinned, now: float) -> ChunkKey | None:
        """The key to evict next among unpinned ones, or None. Does not remove it."""

    def expired(self, now: float) -> list[ChunkKey]:
        """Keys whose time is up (TTL policy); others never expire."""
        return []

    @abstractmethod
    def __len__(self) -> int: ...


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[ChunkKey, None] = OrderedDict()

    def admit(self, key: ChunkKey, nbytes: int, cost: float, now: float) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: ChunkKey, now: float) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: ChunkKey) -> None:
        self._order.pop(key, None)

    def victim(self, is_pinned: IsPinned, now: float) -> ChunkKey | None:
        for key in self._order:
            if not is_pinned(key):
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)


class LFUPolicy(EvictionPolicy):
    """Least frequently used first; ties broken by least recently used.

    Keys live in one LRU-ordered bucket per hit count, so admit, touch and
    remove are O(1) and a victim search visits buckets in ascending count.
    """

    name = "lfu"

    def __init__(self) -> None:
        self._freq: dict[ChunkKey, int] = {}
        self._buckets: dict[int, OrderedDict[ChunkKey, None]] = {}

    def _bucket_add(self, key: ChunkKey, freq: int) -> None:
        self._buckets.setdefault(freq, OrderedDict())[key] = None

    def _bucket_drop(self, key: ChunkKey, freq: int) -> None:
        bucket = self._buckets[freq]
        del bucket[key]
        if not bucket:
            del self._buckets[freq]

    def admit(self, key: ChunkKey, nbytes: int, cost: float, now: float) -> None:
        self.remove(key)
        self._freq[key] = 1
        self._bucket_add(key, 1)

    def touch(self, key: ChunkKey, now: float) -> None:
        freq = self._freq.get(key)
        if freq is None:
            return
        self._bucket_drop(key, freq)
        self._freq[key] = freq + 1
        self._bucket_add(key, freq + 1)

    def remove(self, key: ChunkKey) -> None:
        freq = self._freq.pop(key, None)
        if freq is not None:
            self._bucket_drop(key, freq)

    def victim(self, is_pinned: IsPinned, now: float) -> ChunkKey | None:
        for freq in sorted(self._buckets):
            for key in self._buckets[freq]:
                if not is_pinned(key):
                    return key
        return None

    def __len__(self) -> int:
        return len(self._freq)


class CostAwarePolicy(EvictionPolicy):
    """GreedyDual-Size-Frequency: evict the lowest ``L + hits * cost``.

    ``cost`` is the recompute cost per byte the caller supplied at admission
    (e.g. prefill seconds per byte: deep-prefix chunks cost more to rebuild).
    ``L`` rises to each evicted priority, so old entries age out. A heap with
    lazy invalidation holds the priorities.
    """

    name = "cost"

    def __init__(self) -> None:
        self._clock = 0.0  # L
        self._state: dict[ChunkKey, tuple[float, int, float]] = {}  # key -> (priority, hits, cost)
        self._heap: list[tuple[float, int, ChunkKey]] = []
        self._seq = 0

    def _push(self, key: ChunkKey, priority: float) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (priority, self._seq, key))
        if len(self._heap) > 4 * len(self._state) + 64:
            self._heap = [(p, s, k) for p, s, k in self._heap if self._state.get(k, (None,))[0] == p]
            heapq.heapify(self._heap)

    def admit(self, key: ChunkKey, nbytes: int, cost: float, now: float) -> None:
        if cost < 0:
            raise InvalidInput("recompute cost must be >= 0")
        priority = self._clock + cost
        self._state[key] = (priority, 1, cost)
        self._push(key, priority)

    def touch(self, key: ChunkKey, now: float) -> None:
        state = self._state.get(key)
        if state is None:
            return
        _, hits, cost = state
        priority = self._clock + (hits + 1) * cost
        self._state[key] = (priority, hits + 1, cost)
        self._push(key, priority)

    def remove(self, key: ChunkKey) -> None:
        state = self._state.pop(key, None)
        if state is not None and self._heap and self._heap[0][2] == key:
            self._clock = max(self._clock, state[0])

    def victim(self, is_pinned: IsPinned, now: float) -> ChunkKey | None:
        skipped: list[tuple[float, int, ChunkKey]] = []
        found: ChunkKey | None = None
        while self._heap:
            entry = self._heap[0]
            priority, _, key = entry
            state = self._state.get(key)
            if state is None or state[0] != priority:
                heapq.heappop(self._heap)  # stale
                continue
            if is_pinned(key):
                skipped.append(heapq.heappop(self._heap))
                continue
            found = key
            break
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return found

    def __len__(self) -> int:
        return len(self._state)


class TTLPolicy(EvictionPolicy):
    """Entries live ``ttl_s`` seconds from admission; the earliest deadline goes first."""

    name = "ttl"

    def __init__(self, ttl_s: float = 600.0) -> None:
        if ttl_s <= 0:
            raise InvalidInput("ttl_s must be > 0")
        self.ttl_s = ttl_s
        self._deadline: OrderedDict[ChunkKey, float] = OrderedDict()  # admission order == deadline order

    def admit(self, key: ChunkKey, nbytes: int, cost: float, now: float) -> None:
        self._deadline.pop(key, None)
        self._deadline[key] = now + self.ttl_s

    def touch(self, key: ChunkKey, now: float) -> None:
        """Hits do not extend a TTL."""

    def remove(self, key: ChunkKey) -> None:
        self._deadline.pop(key, None)

    def victim(self, is_pinned: IsPinned, now: float) -> ChunkKey | None:
        for key in self._deadline:
            if not is_pinned(key):
                return key
        return None

    def expired(self, now: float) -> list[ChunkKey]:
        out = []
        for key, deadline in self._deadline.items():
            if deadline > now:
                break
            out.append(key)
        return out

    def __len__(self) -> int:
        return len(self._deadline)


PolicyFactory = Callable[[], EvictionPolicy]
_POLICIES: dict[str, type[EvictionPolicy]] = {}


def register_policy(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
    if cls.name in _POLICIES:
        raise InvalidInput(f"eviction policy {cls.name!r} is already registered")
    _POLICIES[cls.name] = cls
    return cls


for _cls in (LRUPolicy, LFUPolicy, CostAwarePolicy, TTLPolicy):
    register_policy(_cls)


def policy_names() -> list[str]:
    return sorted(_POLICIES)


def make_policy(name: str, ttl_s: float | None = None) -> EvictionPolicy:
    """A new policy by name (``lru``, ``lfu``, ``cost``, ``ttl``).

    Raises:
        UnknownName: no policy of that name.
    """
    try:
        cls = _POLICIES[name]
    except KeyError:
        raise UnknownName(f"unknown eviction policy {name!r}; known: {policy_names()}") from None
    if cls is TTLPolicy:
        return TTLPolicy(ttl_s if ttl_s is not None else 600.0)
    return cls()
