"""What a remote tier wrote: its local byte budget over a Redis it does not own."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from kvstore.keys import ChunkKey
from kvstore.tiers.base import ChunkMeta, MissReason, TierStats


@dataclass(slots=True)
class Written:
    """What this tier remembers of a value it wrote (its budget accounting)."""

    size: int
    meta: ChunkMeta
    deadline: float | None


Victims = list[tuple[ChunkKey, Written]]


class WriteLedger:
    """The values one tier instance wrote, least recently used first, with their TTL deadlines.

    Invariants:
      * ``stats.used_bytes`` is the sum of the sizes held and never exceeds
        ``stats.capacity_bytes``; ``stats.entries`` is how many are held;
      * ``_deadlines`` is in deadline order (one TTL for all writes); an entry
        whose key was written again since is stale and skipped.

    The ledger has no lock: the tier holds its own lock around every call.
    """

    def __init__(self, stats: TierStats, ttl_s: float | None) -> None:
        self._stats = stats
        self._ttl_s = ttl_s
        self._written: OrderedDict[ChunkKey, Written] = OrderedDict()
        self._deadlines: deque[tuple[float, ChunkKey]] = deque()

    def reserve(self, key: ChunkKey, size: int, meta: ChunkMeta, now: float) -> Victims | None:
        """Account for a write, dropping this tier's LRU writes to fit; None if it never fits.

        Returns:
            The writes dropped (the caller unlinks them from Redis), or None.
        """
        self.purge_expired(now)
        self.forget(key)
        if size > self._stats.capacity_bytes:
            return None
        victims: Victims = []
        while self._stats.used_bytes + size > self._stats.capacity_bytes:
            old_key, old = self._written.popitem(last=False)
            self._stats.used_bytes -= old.size
            self._stats.evictions += 1
            victims.append((old_key, old))
        deadline = None if self._ttl_s is None else now + self._ttl_s
        self._written[key] = Written(size, meta, deadline)
        if deadline is not None:
            self._deadlines.append((deadline, key))
        self._stats.used_bytes += size
        self._stats.entries = len(self._written)
        return victims

    def touch(self, key: ChunkKey) -> None:
        """Make a held key the most recently used."""
        if key in self._written:
            self._written.move_to_end(key)

    def forget(self, key: ChunkKey) -> Written | None:
        """Drop a key from the accounting; returns what was held of it."""
        old = self._written.pop(key, None)
        if old is not None:
            self._stats.used_bytes -= old.size
            self._stats.entries = len(self._written)
        return old

    def vanished(self, key: ChunkKey, now: float) -> MissReason:
        """Why a key is gone from Redis, as far as this tier knows (and forget it)."""
        old = self.forget(key)
        if old is None:
            return MissReason.ABSENT
        return MissReason.EXPIRED if old.deadline is not None and now >= old.deadline else MissReason.EVICTED

    def purge_expired(self, now: float) -> None:
        """Forget the writes whose TTL has run out."""
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, key = self._deadlines.popleft()
            old = self._written.get(key)
            if old is not None and old.deadline == deadline:
                self.forget(key)
