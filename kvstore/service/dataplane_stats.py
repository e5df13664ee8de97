"""Counters of the data plane: connections, requests, errors, bytes, latency histograms.

The server owns one :class:`StatsRecorder`; it is touched only on the event
loop thread, so it takes no lock. :meth:`StatsRecorder.snapshot` returns a
frozen :class:`DataPlaneStats`. An injected :class:`DataPlaneObserver` (for
example one feeding Prometheus) sees every reply as it is sent.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("kvstore.dataplane")

#: upper bounds (seconds) of the latency histogram's buckets; the last bucket is +Inf
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


class DataPlaneObserver(Protocol):
    """Receives one call per request answered (injected; the server holds no global metrics).

    ``msg_type`` is the request's type name (``"GET"``, ``"PUT"``, ...), or
    ``"INVALID"`` for frames whose type could not be read; ``seconds`` runs
    from the end of the request's header to the reply being queued (for puts,
    to the commit); ``ok`` is False for ERROR and BUSY replies.
    """

    def observe(self, msg_type: str, seconds: float, ok: bool) -> None: ...


@dataclass(frozen=True, slots=True)
class DataPlaneStats:
    """A snapshot of the data plane's counters.

    Attributes:
        connections: connections open now.
        connections_total: connections accepted since start.
        requests: requests answered, by message type name.
        errors: ERROR replies, by error code name.
        busy: BUSY replies.
        bytes_in: bytes received (prefixes, headers and payloads).
        bytes_out: bytes sent.
        reservations: CPU-tier extents reserved by puts in progress (TCP and shared memory).
        shm_pins: chunks pinned for shared-memory readers now.
        latency_buckets_s: upper bounds of the histogram buckets (a last +Inf bucket follows).
        latency_counts: per message type, requests per bucket (len(latency_buckets_s) + 1 counts).
        latency_sum_s: per message type, the sum of the latencies.
    """

    connections: int
    connections_total: int
    requests: Mapping[str, int]
    errors: Mapping[str, int]
    busy: int
    bytes_in: int
    bytes_out: int
    reservations: int
    shm_pins: int
    latency_buckets_s: tuple[float, ...] = LATENCY_BUCKETS_S
    latency_counts: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    latency_sum_s: Mapping[str, float] = field(default_factory=dict)

    def to_wire(self) -> dict[str, object]:
        """The counters as a msgpack-able map (the STATS reply's ``server`` part)."""
        return {
            "connections": self.connections,
            "connections_total": self.connections_total,
            "requests": dict(self.requests),
            "errors": dict(self.errors),
            "busy": self.busy,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "reservations": self.reservations,
            "shm_pins": self.shm_pins,
        }


class StatsRecorder:
    """Mutable counters behind :class:`DataPlaneStats` (event-loop thread only)."""

    def __init__(self, observer: DataPlaneObserver | None = None) -> None:
        self._observer = observer
        self.connections = 0
        self.connections_total = 0
        self.requests: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.busy = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.reservations = 0
        self.shm_pins = 0
        self._hist: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def opened(self) -> None:
        self.connections += 1
        self.connections_total += 1

    def closed(self) -> None:
        self.connections -= 1

    def answered(
        self, msg_type: str, seconds: float, ok: bool, error: str | None = None, busy: bool = False
    ) -> None:
        """Count one reply: its type, outcome and latency."""
        self.requests[msg_type] = self.requests.get(msg_type, 0) + 1
        if error is not None:
            self.errors[error] = self.errors.get(error, 0) + 1
        if busy:
            self.busy += 1
        hist = self._hist.get(msg_type)
        if hist is None:
            hist = self._hist[msg_type] = [0] * (len(LATENCY_BUCKETS_S) + 1)
        hist[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self._sums[msg_type] = self._sums.get(msg_type, 0.0) + seconds
        if self._observer is not None:
            try:
                self._observer.observe(msg_type, seconds, ok)
            except Exception:
                log.exception("data-plane observer failed")

    def snapshot(self) -> DataPlaneStats:
        return DataPlaneStats(
            connections=self.connections,
            connections_total=self.connections_total,
            requests=dict(self.requests),
            errors=dict(self.errors),
            busy=self.busy,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            reservations=self.reservations,
            shm_pins=self.shm_pins,
            latency_counts={k: tuple(v) for k, v in self._hist.items()},
            latency_sum_s=dict(self._sums),
        )
