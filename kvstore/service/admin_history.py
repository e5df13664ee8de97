"""A small ring buffer of periodic counter samples: the status page's "last minutes".

The daemon samples the store's cumulative counters every
``admin.history_interval_s`` seconds and keeps ``admin.history_samples`` of
them; rates are differences of neighbouring samples, computed by whoever
reads them (the status page). Memory is bounded by the ring's length.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

from kvstore.service.admin_metrics import Snapshot

log = logging.getLogger("kvstore.daemon")


@dataclass(frozen=True, slots=True)
class Sample:
    """Cumulative counters at one moment (unix time ``t``).

    Attributes:
        t: when the sample was taken (seconds since the epoch).
        lookups, lookup_query_chunks, lookup_hit_chunks: prefix lookups and their chunks.
        gets, get_hits: chunk reads and those that found the chunk.
        puts, put_bytes: chunks and bytes stored in the top tier.
        read_bytes: bytes read from every tier.
        requests: data-plane requests finished.
    """

    t: float
    lookups: int
    lookup_query_chunks: int
    lookup_hit_chunks: int
    gets: int
    get_hits: int
    puts: int
    put_bytes: int
    read_bytes: int
    requests: int

    @classmethod
    def of(cls, snap: Snapshot) -> Sample:
        s = snap.store
        top = s.tiers[0]
        return cls(
            t=round(snap.taken_at, 3),
            lookups=s.lookups,
            lookup_query_chunks=s.lookup_query_chunks,
            lookup_hit_chunks=s.lookup_hit_chunks,
            gets=s.gets,
            get_hits=s.get_hits,
            puts=top.puts,
            put_bytes=top.put_bytes,
            read_bytes=sum(t.hit_bytes for t in s.tiers),
            requests=sum(c.count for c in snap.requests.values()),
        )


class StatsHistory:
    """The last ``capacity`` samples, oldest first; thread-safe."""

    def __init__(self, interval_s: float, capacity: int) -> None:
        self.interval_s = interval_s
        self._ring: deque[Sample] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def add(self, sample: Sample) -> None:
        with self._lock:
            self._ring.append(sample)

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._ring)

    def as_json(self) -> dict[str, object]:
        return {"interval_s": self.interval_s, "samples": [asdict(s) for s in self.samples()]}


async def sample_forever(history: StatsHistory, snapshot: Callable[[], Snapshot]) -> None:
    """Add a sample now and then every ``history.interval_s`` seconds until cancelled."""
    while True:
        try:
            history.add(Sample.of(await asyncio.to_thread(snapshot)))
        except Exception:  # a failing snapshot (e.g. during shutdown) must not stop sampling
            log.exception("stats sample failed")
        await asyncio.sleep(history.interval_s)
