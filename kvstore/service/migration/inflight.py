"""Chunks announced as on their way to this daemon, and bounded waits for them.

In a prefill/decode hand-off the prefill side pushes a request's chunks to
the decode side's daemon while prefill still runs. The decode side may look
the prompt up before the last chunks arrive; without help it would see a
short hit and recompute what is already on the wire. So a transfer first
*announces* the keys it is about to send, and a LOOKUP may ask to wait (up to
its own bound) for announced keys that follow its local hit.

An announcement expires by itself (its ``ttl_s``); a key stops being awaited
when the store reports it stored (a ``stored`` event: it can be fetched), when
it is withdrawn (the sender gave up) or when its namespace is cleared. Waiting
never returns data: the caller looks up again afterwards, so whatever arrived
is served through the normal, checksummed path.

Store events come from any thread; the registry's state is guarded by a lock
and waiters are woken on their event loop.
"""

from __future__ import annotations

import asyncio
import heapq
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvstore.errors import Busy, InvalidInput
from kvstore.events import StoreEvent
from kvstore.keys import ChunkKey, NamespaceId

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class InflightLimits:
    """Bounds of the registry: announced keys held at once, an announcement's life, a wait."""

    max_keys: int = 1 << 20
    max_ttl_s: float = 600.0
    max_wait_s: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_keys, int) or self.max_keys < 1:
            raise InvalidInput(f"max_keys must be an int >= 1, got {self.max_keys!r}")
        for name in ("max_ttl_s", "max_wait_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise InvalidInput(f"{name} must be a number > 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class InflightStats:
    pending: int
    announced: int  # keys ever announced
    arrived: int  # announced keys that were stored before they expired
    expired: int
    withdrawn: int
    waits: int
    wait_timeouts: int


@dataclass(slots=True)
class _Waiter:
    loop: asyncio.AbstractEventLoop
    wake: asyncio.Event


class Inflight:
    """The announced keys of one daemon (all namespaces), as an event sink for its store."""

    def __init__(self, limits: InflightLimits | None = None, clock: Clock = time.monotonic) -> None:
        self.limits = limits or InflightLimits()
        self._clock = clock
        self._lock = threading.Lock()
        self._due: dict[tuple[NamespaceId, ChunkKey], float] = {}  # (ns, key) -> expiry
        self._heap: list[tuple[float, NamespaceId, ChunkKey]] = []  # expiries; stale entries skipped
        self._waiters: list[_Waiter] = []
        self._counts = dict.fromkeys(("announced", "arrived", "expired", "withdrawn", "waits", "timeouts"), 0)

    # -- announcing ---------------------------------------------------------------------
    def announce(self, ns: NamespaceId, keys: Sequence[ChunkKey], ttl_s: float) -> int:
        """Expect ``keys`` of ``ns`` within ``ttl_s``; how many were not already expected.

        Raises ``InvalidInput`` for a bad ttl and ``Busy`` when the registry
        would hold more than ``max_keys`` (nothing is announced then).
        """
        if not isinstance(ttl_s, (int, float)) or not 0 < ttl_s <= self.limits.max_ttl_s:
            raise InvalidInput(f"ttl_s must be in (0, {self.limits.max_ttl_s}], got {ttl_s!r}")
        now = self._clock()
        with self._lock:
            self._expire(now)
            new = [k for k in dict.fromkeys(keys) if (ns, k) not in self._due]
            if len(self._due) + len(new) > self.limits.max_keys:
                raise Busy(f"{len(self._due)} chunks are already announced (at most {self.limits.max_keys})")
            for key in keys:
                self._due[(ns, key)] = now + ttl_s
                heapq.heappush(self._heap, (now + ttl_s, ns, key))
            if len(self._heap) > 2 * len(self._due) + 1024:  # re-announcements left stale entries
                self._heap = [(due, n, k) for (n, k), due in self._due.items()]
                heapq.heapify(self._heap)
            self._counts["announced"] += len(new)
        return len(new)

    def withdraw(self, ns: NamespaceId, keys: Sequence[ChunkKey]) -> int:
        """Stop expecting ``keys`` (their sender gave up); how many were expected."""
        with self._lock:
            gone = sum(self._due.pop((ns, k), None) is not None for k in dict.fromkeys(keys))
            self._counts["withdrawn"] += gone
        if gone:
            self._wake_all()
        return gone

    def arrived(self, ns: NamespaceId, keys: Sequence[ChunkKey]) -> int:
        """Stop expecting ``keys`` that are here already (found held after they were announced)."""
        with self._lock:
            here = sum(self._due.pop((ns, k), None) is not None for k in dict.fromkeys(keys))
            self._counts["arrived"] += here
        if here:
            self._wake_all()
        return here

    def pending(self, ns: NamespaceId, keys: Sequence[ChunkKey]) -> int:
        """How many of ``keys``, from the first, are announced and not yet here."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            run = 0
            for key in keys:
                if (ns, key) not in self._due:
                    break
                run += 1
            return run

    # -- the store's events (any thread) --------------------------------------------------
    def emit(self, event: StoreEvent) -> None:
        if event.kind == "stored" and event.namespace is not None and event.key is not None:
            with self._lock:
                hit = self._due.pop((event.namespace, event.key), None) is not None
                self._counts["arrived"] += hit
        elif event.kind == "cleared":
            with self._lock:
                doomed = [nk for nk in self._due if event.namespace is None or nk[0] == event.namespace]
                for nk in doomed:
                    del self._due[nk]
                self._counts["withdrawn"] += len(doomed)
            hit = bool(doomed)
        else:
            return
        if hit:
            self._wake_all()

    # -- waiting ----------------------------------------------------------------------------
    async def wait(self, ns: NamespaceId, keys: Sequence[ChunkKey], timeout_s: float) -> bool:
        """Wait until none of the leading announced run of ``keys`` is still expected.

        Returns True when the run drained (arrived, withdrawn or expired) and
        False on ``timeout_s`` (bounded by ``max_wait_s``). Returns at once
        when the first key is not announced.
        """
        if not isinstance(timeout_s, (int, float)) or timeout_s < 0:
            raise InvalidInput(f"wait_s must be a number >= 0, got {timeout_s!r}")
        deadline = self._clock() + min(float(timeout_s), self.limits.max_wait_s)
        run = list(keys[: self.pending(ns, keys)])
        if not run:
            return True
        waiter = _Waiter(asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.append(waiter)
            self._counts["waits"] += 1
        try:
            while True:
                waiter.wake.clear()
                now = self._clock()
                with self._lock:
                    self._expire(now)
                    left = [k for k in run if (ns, k) in self._due]
                    soonest = min((self._due[(ns, k)] for k in left), default=now)
                if not left:
                    return True
                budget = deadline - now
                if budget <= 0:
                    with self._lock:
                        self._counts["timeouts"] += 1
                    return False
                # wake on an event, or when the earliest announcement would expire
                try:
                    await asyncio.wait_for(waiter.wake.wait(), max(0.0, min(budget, soonest - now)) + 1e-3)
                except TimeoutError:
                    pass
        finally:
            with self._lock:
                self._waiters.remove(waiter)

    def stats(self) -> InflightStats:
        with self._lock:
            self._expire(self._clock())
            c = self._counts
            return InflightStats(
                pending=len(self._due),
                announced=c["announced"],
                arrived=c["arrived"],
                expired=c["expired"],
                withdrawn=c["withdrawn"],
                waits=c["waits"],
                wait_timeouts=c["timeouts"],
            )

    # -- internals (lock held where noted) --------------------------------------------------
    def _expire(self, now: float) -> None:
        """Drop announcements past their ttl (lock held)."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, ns, key = heapq.heappop(heap)
            if self._due.get((ns, key)) == due:
                del self._due[(ns, key)]
                self._counts["expired"] += 1

    def _wake_all(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for w in waiters:
            try:
                w.loop.call_soon_threadsafe(w.wake.set)
            except RuntimeError:  # its loop is closed: the waiter is gone with it
                pass
