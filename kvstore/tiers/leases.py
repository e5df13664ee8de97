"""Leases: time-bounded pins on looked-up chunks.

A lookup pins its hits so they are not evicted before the engine reads them.
The lease records exactly which (tier, key) pins it holds and releases them by
popping that record, so releasing twice is harmless and a pin is never
released by anyone else. Every lease has a deadline and expires by itself.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from kvstore.errors import CapacityError, InvalidInput, LeaseError
from kvstore.keys import ChunkKey
from kvstore.tiers.base import Tier

LeaseId = int
Clock = Callable[[], float]


@dataclass(slots=True)
class Lease:
    """The pins one lookup holds. ``pins`` maps a key to the tier pinning it."""

    id: LeaseId
    deadline: float
    pins: dict[ChunkKey, Tier] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LeaseStats:
    active: int
    pinned_chunks: int
    granted: int
    released: int
    expired: int


class LeaseTable:
    """All live leases of a store.

    Invariants: each (lease, key) pin was taken exactly once with ``tier.pin``
    and is given back exactly once with ``tier.unpin``; a lease past its
    deadline is released by :meth:`expire` (called on every operation and by
    the store's reaper thread); at most ``max_leases`` are live.
    """

    def __init__(self, clock: Clock, default_ttl_s: float, max_leases: int) -> None:
        if default_ttl_s <= 0:
            raise InvalidInput("lease ttl must be > 0")
        if max_leases < 1:
            raise InvalidInput("max_leases must be >= 1")
        self._clock = clock
        self.default_ttl_s = default_ttl_s
        self.max_leases = max_leases
        self._leases: dict[LeaseId, Lease] = {}
        self._deadlines: list[tuple[float, LeaseId]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._granted = self._released = self._expired = 0

    def grant(self, pins: dict[ChunkKey, Tier], ttl_s: float | None = None) -> LeaseId:
        """Take ownership of pins the caller already took (and of the dict); returns the lease id.

        Raises:
            CapacityError: too many live leases (the pins are given back first).
        """
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            self._unpin_all(pins)
            raise InvalidInput("lease ttl must be > 0")
        self.expire()
        with self._lock:
            if len(self._leases) >= self.max_leases:
                full = True
            else:
                full = False
                lease = Lease(next(self._ids), self._clock() + ttl, pins)
                self._leases[lease.id] = lease
                heapq.heappush(self._deadlines, (lease.deadline, lease.id))
                self._granted += 1
        if full:
            self._unpin_all(pins)
            raise CapacityError(f"too many live leases ({self.max_leases}); release or let them expire")
        return lease.id

    def tier_of(self, lease_id: LeaseId, key: ChunkKey) -> Tier | None:
        """The tier a live lease pins ``key`` in, or None."""
        with self._lock:
            lease = self._leases.get(lease_id)
            return None if lease is None else lease.pins.get(key)

    def check(self, lease_id: LeaseId) -> None:
        """Raises LeaseError unless the lease is live."""
        self.expire()
        with self._lock:
            if lease_id not in self._leases:
                raise LeaseError(f"lease {lease_id} is unknown, expired or released")

    def consume(self, lease_id: LeaseId, key: ChunkKey) -> None:
        """Release the lease's pin on one key (after it was read); harmless if absent."""
        with self._lock:
            lease = self._leases.get(lease_id)
            tier = None if lease is None else lease.pins.pop(key, None)
            if lease is not None and not lease.pins:
                del self._leases[lease_id]
                self._released += 1
        if tier is not None:
            tier.unpin(key)

    def release(self, lease_id: LeaseId) -> bool:
        """Give back every pin of a lease. True if it was live; releasing twice is harmless."""
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is not None:
                self._released += 1
        if lease is None:
            return False
        self._unpin_all(lease.pins)
        return True

    def expire(self) -> int:
        """Release every lease past its deadline; returns how many."""
        now = self._clock()
        dead: list[Lease] = []
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                _, lease_id = heapq.heappop(self._deadlines)
                lease = self._leases.pop(lease_id, None)
                if lease is not None:
                    dead.append(lease)
            self._expired += len(dead)
        for lease in dead:
            self._unpin_all(lease.pins)
        return len(dead)

    def release_all(self) -> None:
        with self._lock:
            leases = list(self._leases.values())
            self._leases.clear()
            self._deadlines.clear()
            self._released += len(leases)
        for lease in leases:
            self._unpin_all(lease.pins)

    def next_deadline(self) -> float | None:
        with self._lock:
            return self._deadlines[0][0] if self._deadlines else None

    def stats(self) -> LeaseStats:
        with self._lock:
            return LeaseStats(
                active=len(self._leases),
                pinned_chunks=sum(len(lease.pins) for lease in self._leases.values()),
                granted=self._granted,
                released=self._released,
                expired=self._expired,
            )

    def live(self) -> list[Lease]:
        """A snapshot of live leases (for the admin API)."""
        with self._lock:
            return [Lease(l.id, l.deadline, dict(l.pins)) for l in self._leases.values()]

    @staticmethod
    def _unpin_all(pins: dict[ChunkKey, Tier]) -> None:
        for key, tier in pins.items():
            tier.unpin(key)
