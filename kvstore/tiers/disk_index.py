"""The disk tier's in-memory index: what LMDB holds, what is pinned, the budget and eviction choices."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from kvstore.errors import KVStoreError, LeaseError
from kvstore.keys import ChunkKey, NamespaceId
from kvstore.tiers.base import ChunkMeta, MissReason, TierStats
from kvstore.tiers.policies import EvictionPolicy
from kvstore.tiers.record import HEADER_BYTES

Victims = list[tuple[ChunkKey, ChunkMeta]]

_GONE_MEMORY = 65536  # keys whose miss reason (evicted, expired, corrupt) is remembered


def record_bytes(meta: ChunkMeta) -> int:
    """What a record costs the budget: its header and its payload."""
    return HEADER_BYTES + meta.nbytes


class DiskIndex:
    """The chunks of one disk tier, their pins and their eviction order.

    Invariants:
      * ``stats.used_bytes`` is the sum of ``104 + payload`` over the entries
        and ``stats.entries`` their number; the policy knows exactly the entries;
      * only this index changes pin counts, and a pinned key is never chosen
        as a victim (expired or evicted); a count never goes below zero;
      * a doomed key was deleted while pinned: it stays an entry (readable by
        its pin holders) but is not listed, and goes at its last unpin;
      * ``_gone`` remembers why the last 65536 keys that left did (evicted,
        expired, corrupt), so a later miss is counted under that reason.

    No lock of its own: the tier calls it with its lock held.
    """

    def __init__(
        self, name: str, stats: TierStats, policy: EvictionPolicy, clock: Callable[[], float]
    ) -> None:
        self._name = name
        self._stats = stats
        self._policy = policy
        self._clock = clock
        self._entries: dict[ChunkKey, ChunkMeta] = {}
        self._pins: dict[ChunkKey, int] = {}
        self._doomed: set[ChunkKey] = set()  # deleted while pinned
        self._gone: OrderedDict[ChunkKey, MissReason] = OrderedDict()

    # -- lookups ------------------------------------------------------------------------
    def meta(self, key: ChunkKey) -> ChunkMeta | None:
        """The entry's meta (a doomed one too), or None."""
        return self._entries.get(key)

    def holds(self, key: ChunkKey, meta: ChunkMeta) -> bool:
        """Whether the same content (length and checksum) is stored under ``key`` and not doomed."""
        old = self._entries.get(key)
        return old is not None and key not in self._doomed and old.checksum == meta.checksum \
            and old.nbytes == meta.nbytes

    def listed(self, namespace: NamespaceId | None) -> list[ChunkKey]:
        """The keys held (of one namespace), without the doomed ones."""
        return [k for k, m in self._entries.items()
                if k not in self._doomed and namespace in (None, m.namespace)]

    def gone_reason(self, key: ChunkKey, default: MissReason) -> MissReason:
        """Why ``key`` left, if remembered, else ``default``."""
        return self._gone.get(key, default)

    def touch(self, key: ChunkKey, now: float) -> None:
        self._policy.touch(key, now)

    # -- pins ---------------------------------------------------------------------------
    def pin(self, key: ChunkKey) -> bool:
        """Count one pin on a present, not doomed key; False otherwise."""
        if key not in self._entries or key in self._doomed:
            return False
        self._pins[key] = self._pins.get(key, 0) + 1
        return True

    def unpin(self, key: ChunkKey) -> bool:
        """Release one pin; True if it was the last pin of a doomed key (the caller removes it now).

        Raises:
            LeaseError: the key holds no pin.
        """
        count = self._pins.get(key, 0)
        if count == 0:
            raise LeaseError(f"unpin of a chunk that tier {self._name!r} does not hold pinned")
        if count > 1:
            self._pins[key] = count - 1
            return False
        del self._pins[key]
        return key in self._doomed

    def remove(self, keys: list[ChunkKey], doomed_only: bool) -> tuple[int, Victims]:
        """Detach the present unpinned keys and doom the pinned ones (only doomed keys if
        ``doomed_only``); returns how many were present and what was detached."""
        present = [k for k in keys if k in self._entries and not (k in self._doomed and k in self._pins)
                   and (k in self._doomed or not doomed_only)]
        removed = [(k, self.detach(k, None)) for k in present if k not in self._pins]
        self._doomed.update(k for k in present if k in self._pins)
        return len(present), removed

    # -- entries and the budget ---------------------------------------------------------
    def attach(self, key: ChunkKey, meta: ChunkMeta) -> None:
        old = self._entries.get(key)
        self._entries[key] = meta
        self._stats.used_bytes += record_bytes(meta) - (record_bytes(old) if old else 0)
        self._stats.entries = len(self._entries)
        self._policy.admit(key, meta.nbytes, meta.cost, self._clock())
        self._gone.pop(key, None)
        self._doomed.discard(key)

    def detach(self, key: ChunkKey, reason: MissReason | None) -> ChunkMeta:
        meta = self._entries.pop(key)
        self._stats.used_bytes -= record_bytes(meta)
        self._stats.entries = len(self._entries)
        self._policy.remove(key)
        self._doomed.discard(key)
        if reason is None:
            self._gone.pop(key, None)
        else:
            self.remember(key, reason)
        return meta

    def remember(self, key: ChunkKey, reason: MissReason) -> None:
        self._gone[key] = reason
        self._gone.move_to_end(key)
        if len(self._gone) > _GONE_MEMORY:
            self._gone.popitem(last=False)

    def expire(self, keep: ChunkKey | None, now: float) -> Victims:
        """Detach the unpinned chunks whose time is up (never ``keep``)."""
        return [(k, self.detach(k, MissReason.EXPIRED)) for k in self._policy.expired(now)
                if k != keep and k not in self._pins and k in self._entries]

    def choose_victims(self, key: ChunkKey | None, rec: int, now: float) -> Victims | None:
        """Detach expired chunks, then policy victims until ``rec`` bytes fit; None if they never can."""
        capacity = self._stats.capacity_bytes
        pinned = sum(record_bytes(self._entries[k]) for k in self._pins if k != key and k in self._entries)
        if rec + pinned > capacity:
            return None
        victims = self.expire(key, now)
        old = self._entries.get(key) if key is not None else None
        free = capacity - self._stats.used_bytes + (record_bytes(old) if old else 0)
        if free < rec:
            victims += self.evict_more(key, rec - free, now)
            if capacity - self._stats.used_bytes + (record_bytes(old) if old else 0) < rec:
                raise KVStoreError(f"tier {self._name!r}: eviction policy ran out of victims")  # unreachable
        return victims

    def evict_more(self, key: ChunkKey | None, nbytes: int, now: float) -> Victims:
        """Detach unpinned policy victims (never ``key``) worth at least ``nbytes``, or all there are."""
        victims: Victims = []
        while nbytes > 0:
            victim = self._policy.victim(lambda k: k == key or k in self._pins, now)
            if victim is None:
                break
            victims.append((victim, self.detach(victim, MissReason.EVICTED)))
            nbytes -= record_bytes(victims[-1][1])
        return victims
