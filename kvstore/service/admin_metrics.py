"""The daemon's metrics: one CollectorRegistry per daemon, never the global default.

``DaemonMetrics`` owns the registry. Store and tier counters are not copied
into metric objects: a collector reads one :class:`Snapshot` per scrape, so
the numbers on ``/metrics`` and ``/v1/stats`` come from the same place.
Request latencies arrive through :class:`RequestObserver`, the object the
data plane is given (``observe(msg_type, seconds, ok)``), and through the
admin API's own middleware.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvstore.tiers.base import TierStats
from kvstore.tiers.store import StoreStats, TieredStore

LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
_METRIC_NAME = re.compile(r"[^a-zA-Z0-9_]")
DataPlaneNumbers = dict[str, float | dict[str, float]]


@dataclass(slots=True)
class RequestCount:
    """Requests of one message type seen by the data plane."""

    count: int = 0
    errors: int = 0
    seconds: float = 0.0


class RequestObserver:
    """Latency sink handed to the data plane; thread-safe.

    Invariant: every observation lands both in the Prometheus histogram and
    in the per-type totals that /v1/stats and the status page read.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._hist = Histogram(
            "kvstore_request_seconds",
            "Data-plane request latency by message type and outcome.",
            ["type", "outcome"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self._lock = threading.Lock()
        self._counts: dict[str, RequestCount] = {}

    def observe(self, msg_type: str, seconds: float, ok: bool) -> None:
        """Record one finished request."""
        self._hist.labels(msg_type, "ok" if ok else "error").observe(seconds)
        with self._lock:
            c = self._counts.setdefault(msg_type, RequestCount())
            c.count += 1
            c.errors += not ok
            c.seconds += seconds

    def totals(self) -> dict[str, RequestCount]:
        with self._lock:
            return {k: RequestCount(v.count, v.errors, v.seconds) for k, v in self._counts.items()}


@dataclass(frozen=True, slots=True)
class TierView:
    """One tier in a snapshot: its counters, kind and whether it is reachable now."""

    stats: TierStats
    kind: str
    up: bool


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything /metrics, /v1/stats and the history sampler read, taken at one moment."""

    store: StoreStats
    tiers: tuple[TierView, ...]
    requests: dict[str, RequestCount]
    data_plane: DataPlaneNumbers | None
    taken_at: float = field(default_factory=time.time)


def take_snapshot(
    store: TieredStore, observer: RequestObserver, data_plane: Callable[[], object] | None
) -> Snapshot:
    """A consistent-enough view of the store (blocking: may PING a down Redis; run it in a thread)."""
    stats = store.stats()
    views = tuple(
        TierView(s, str(getattr(t, "kind", t.name)), bool(getattr(t, "available", True)))
        for t, s in zip(store.tiers, stats.tiers)
    )
    return Snapshot(stats, views, observer.totals(), data_plane_numbers(data_plane()) if data_plane else None)


def data_plane_numbers(value: object) -> DataPlaneNumbers:
    """The numeric fields of the data plane's stats, and its maps of numbers (requests by type...).

    Other values (the raw latency histograms: the observer already feeds ours) are left out.
    """
    if is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in fields(value)}
    out: DataPlaneNumbers = {}
    if not isinstance(value, Mapping):
        return out
    for name, v in value.items():
        key = _METRIC_NAME.sub("_", str(name))
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
        elif isinstance(v, Mapping) and all(isinstance(x, (int, float)) for x in v.values()):
            out[key] = {str(k): float(x) for k, x in v.items()}
    return out


class StoreCollector(Collector):
    """Prometheus families from one snapshot per scrape."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        yield from _tier_families(s.tiers)
        yield from _store_families(s.store)
        for name, value in sorted((s.data_plane or {}).items()):
            doc = f"Data-plane server statistic {name}."
            if isinstance(value, dict):
                fam = GaugeMetricFamily(f"kvstore_dataplane_{name}", doc, labels=["key"])
                for k, v in sorted(value.items()):
                    fam.add_metric([k], v)
                yield fam
            else:
                yield GaugeMetricFamily(f"kvstore_dataplane_{name}", doc, value)


def _tier_families(tiers: tuple[TierView, ...]) -> Iterator[Metric]:
    def fam(
        kind: type[GaugeMetricFamily | CounterMetricFamily],
        name: str,
        doc: str,
        get: Callable[[TierView], float],
    ) -> Metric:
        m = kind(name, doc, labels=["tier"])
        for t in tiers:
            m.add_metric([t.stats.name], get(t))
        return m

    g, c = GaugeMetricFamily, CounterMetricFamily
    yield fam(c, "kvstore_tier_hits", "Reads a tier answered.", lambda t: t.stats.hits)
    yield fam(c, "kvstore_tier_hit_bytes", "Bytes read from a tier.", lambda t: t.stats.hit_bytes)
    yield fam(c, "kvstore_tier_puts", "Chunks stored in a tier.", lambda t: t.stats.puts)
    yield fam(c, "kvstore_tier_put_bytes", "Bytes stored in a tier.", lambda t: t.stats.put_bytes)
    yield fam(
        c, "kvstore_tier_evictions", "Chunks a tier evicted for its budget.", lambda t: t.stats.evictions
    )
    yield fam(c, "kvstore_tier_rejected", "Puts a tier refused.", lambda t: t.stats.rejected)
    yield fam(g, "kvstore_tier_used_bytes", "Bytes a tier holds.", lambda t: t.stats.used_bytes)
    yield fam(g, "kvstore_tier_capacity_bytes", "A tier's byte budget.", lambda t: t.stats.capacity_bytes)
    yield fam(g, "kvstore_tier_entries", "Chunks a tier holds.", lambda t: t.stats.entries)
    yield fam(g, "kvstore_tier_up", "1 if the tier is reachable now (Redis), else 0.", lambda t: float(t.up))
    misses = CounterMetricFamily(
        "kvstore_tier_misses", "Reads a tier could not answer, by reason.", labels=["tier", "reason"]
    )
    for t in tiers:
        for reason, n in sorted(t.stats.misses.items()):
            misses.add_metric([t.stats.name, reason], n)
    yield misses


def _store_families(s: StoreStats) -> Iterator[Metric]:
    g, c = GaugeMetricFamily, CounterMetricFamily
    yield g("kvstore_leases_active", "Live leases.", s.leases.active)
    yield g("kvstore_leases_pinned_chunks", "Chunks pinned by live leases.", s.leases.pinned_chunks)
    yield c("kvstore_leases_granted", "Leases granted.", s.leases.granted)
    yield c("kvstore_leases_released", "Leases released (or consumed) by their holder.", s.leases.released)
    yield c("kvstore_leases_expired", "Leases that ran out.", s.leases.expired)
    yield g("kvstore_writer_queue_depth", "Queued background writes to lower tiers.", s.writer.depth)
    yield c("kvstore_writer_queued", "Background writes queued.", s.writer.queued)
    yield c("kvstore_writer_written", "Background writes done.", s.writer.written)
    yield c("kvstore_writer_dropped", "Background writes dropped (queue full).", s.writer.dropped)
    yield c("kvstore_writer_failed", "Background writes a tier failed.", s.writer.failed)
    yield c("kvstore_lookups", "Prefix lookups.", s.lookups)
    yield c("kvstore_lookup_query_chunks", "Full chunks asked for by lookups.", s.lookup_query_chunks)
    yield c("kvstore_lookup_hit_chunks", "Chunks lookups found.", s.lookup_hit_chunks)
    yield c("kvstore_gets", "Chunk reads.", s.gets)
    yield c("kvstore_get_hits", "Chunk reads that found the chunk.", s.get_hits)
    yield c("kvstore_get_misses", "Chunk reads that found nothing.", s.get_misses)
    yield c("kvstore_promotions", "Lower-tier hits copied into the top tier.", s.promotions)
    yield c(
        "kvstore_decode_errors", "Codec containers a lower tier held that did not decode.", s.decode_errors
    )
    yield g("kvstore_namespaces", "Registered namespaces.", s.namespaces)
    yield g("kvstore_index_entries", "Keys in the prefix index.", s.index_entries)


class DaemonMetrics:
    """The per-daemon registry with its collectors and latency histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = RequestObserver(self.registry)
        self.admin_latency = Histogram(
            "kvstore_admin_request_seconds",
            "Admin API request latency by route and status.",
            ["route", "method", "status"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        ProcessCollector(registry=self.registry)

    def watch(self, snapshot: Callable[[], Snapshot]) -> None:
        """Export the store's counters, read through ``snapshot`` at every scrape."""
        self.registry.register(StoreCollector(snapshot))

    def exposition(self) -> bytes:
        """The Prometheus text format of everything (blocking: collects a snapshot)."""
        return generate_latest(self.registry)
