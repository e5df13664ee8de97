"""What one data-plane connection holds, and which tenant owns which lease.

A :class:`Session` records every pin and reservation its connection takes
and gives them back by popping its own maps, so releasing twice is harmless
and a dropped connection returns everything (:meth:`Session.release_all`).
A :class:`LeaseBook` remembers the tenant of each lease the data plane
granted, so one tenant can neither read through nor release another's lease.
Both are used on the event loop thread only.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import xxhash

from kvstore.errors import LeaseError
from kvstore.keys import ChunkKey, Namespace
from kvstore.service.dataplane_stats import StatsRecorder
from kvstore.service.dataplane_store import StoreAccess
from kvstore.service.protocol import PayloadTooLarge, ServerBusy
from kvstore.tiers.arena import Extent
from kvstore.tiers.leases import LeaseId


@dataclass(slots=True)
class Slot:
    """One key of a reservation: its extent (None: nothing to write) and chunk size.

    ``present`` marks a key already stored (nothing to write, counts as stored);
    an extent of None that is not present means the tier had no room.
    """

    key: ChunkKey
    extent: Extent | None
    size: int
    present: bool = False
    hasher: xxhash.xxh3_128 | None = None  # shared-memory puts: bytes [0, hashed) already hashed
    hashed: int = 0


@dataclass(slots=True)
class Reservation:
    """Extents reserved for one put; committed or aborted exactly once (then emptied)."""

    ns: Namespace
    slots: list[Slot]
    deadline: float

    @property
    def extents(self) -> int:
        return sum(s.extent is not None for s in self.slots)


class Session:
    """The state of one connection: its tenant, shared-memory pins and open reservations.

    Invariant: every key in ``pins`` holds exactly one top-tier pin taken by
    this session; every extent in ``reservations`` is reserved and neither
    committed nor aborted yet; both are empty after :meth:`release_all`.
    """

    def __init__(self, access: StoreAccess, stats: StatsRecorder, max_pins: int) -> None:
        self.access = access
        self.stats = stats
        self.max_pins = max_pins
        self.tenant: str | None = None
        self.authenticated = False
        self.shm_offered = False
        self.pins: dict[int, list[ChunkKey]] = {}
        self.pinned = 0
        self.reservations: dict[int, Reservation] = {}
        self._ids = itertools.count(1)

    # -- shared-memory pins ------------------------------------------------------------
    def hold_pins(self, keys: list[ChunkKey]) -> int:
        """Record pins already taken on ``keys``; returns the pin id the client releases."""
        pin_id = next(self._ids)
        self.pins[pin_id] = keys
        self.pinned += len(keys)
        self.stats.shm_pins += len(keys)
        return pin_id

    def release_pins(self, pin_id: int) -> bool:
        keys = self.pins.pop(pin_id, None)
        if keys is None:
            return False
        self.pinned -= len(keys)
        self.stats.shm_pins -= len(keys)
        for key in keys:
            self.access.unpin(key)
        return True

    # -- reservations ------------------------------------------------------------------
    def open_reservation(self, ns: Namespace, slots: list[Slot], ttl_s: float) -> int:
        rid = next(self._ids)
        res = Reservation(ns, slots, time.monotonic() + ttl_s)
        self.reservations[rid] = res
        self.stats.reservations += res.extents
        return rid

    def take_reservation(self, rid: int) -> Reservation:
        """Remove and return an open reservation; the caller commits or aborts its extents.

        Raises:
            LeaseError: unknown, already committed, or expired.
        """
        res = self.reservations.pop(rid, None)
        if res is None:
            raise LeaseError(f"reservation {rid} is unknown, committed or expired")
        self.stats.reservations -= res.extents
        return res

    def abort_reservation(self, rid: int) -> None:
        res = self.reservations.pop(rid, None)
        if res is not None:
            self.stats.reservations -= res.extents
            self.abort(res)

    def abort(self, res: Reservation) -> None:
        """Give back every extent of a reservation taken out of the session."""
        for slot in res.slots:
            if slot.extent is not None:
                extent, slot.extent = slot.extent, None
                self.access.abort(extent)

    def expire(self, now: float) -> int:
        """Abort reservations past their deadline; returns how many."""
        dead = [rid for rid, res in self.reservations.items() if res.deadline <= now]
        for rid in dead:
            self.abort_reservation(rid)
        return len(dead)

    def release_all(self) -> None:
        """Give back every pin and reservation (the connection is gone); idempotent."""
        for pin_id in list(self.pins):
            self.release_pins(pin_id)
        for rid in list(self.reservations):
            self.abort_reservation(rid)


class Budget:
    """The in-flight bytes of one connection: payloads being received and replies being sent.

    Invariant: ``used`` is the sum of what :meth:`take` granted and :meth:`give` has not
    returned; it never exceeds ``limit``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        """Count ``n`` more bytes in flight.

        Raises:
            PayloadTooLarge: ``n`` alone exceeds the limit (retrying cannot help).
            ServerBusy: the connection has too much in flight now (retry later).
        """
        if n > self.limit:
            raise PayloadTooLarge(
                f"request of {n} bytes exceeds the connection's in-flight limit {self.limit}"
            )
        if self.used + n > self.limit:
            raise ServerBusy(
                f"{self.used} bytes in flight on this connection; {n} more would exceed {self.limit}", 0.01
            )
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


class LeaseBook:
    """The tenant of every live lease the data plane granted (bounded: pruned as leases expire)."""

    def __init__(self) -> None:
        self._owners: dict[LeaseId, tuple[str | None, float]] = {}

    def add(self, lease: LeaseId, tenant: str | None, ttl_s: float) -> None:
        self._owners[lease] = (tenant, time.monotonic() + ttl_s)

    def check(self, lease: LeaseId, tenant: str | None) -> bool:
        """Whether ``lease`` is live and ``tenant``'s; False if unknown, expired or released.

        Raises:
            LeaseError: the lease is live and another tenant's.
        """
        entry = self._owners.get(lease)
        if entry is None or entry[1] < time.monotonic():
            return False
        if entry[0] != tenant:
            raise LeaseError(f"lease {lease} is unknown, expired or released")
        return True

    def discard(self, lease: LeaseId) -> None:
        self._owners.pop(lease, None)

    def prune(self, now: float) -> None:
        for lease in [k for k, (_, deadline) in self._owners.items() if deadline < now]:
            del self._owners[lease]

    def __len__(self) -> int:
        return len(self._owners)
