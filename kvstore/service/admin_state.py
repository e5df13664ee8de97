"""What the daemon's aiohttp application holds, under typed AppKeys.

Each value is put in place by one cleanup context in daemon.py (store,
metrics, data plane, history) and read by the admin handlers; nothing here
is a module global.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from kvstore.connectors.vllm_events import EventFanout
from kvstore.service.admin_history import StatsHistory
from kvstore.service.admin_metrics import DaemonMetrics, Snapshot, take_snapshot
from kvstore.service.config import DaemonConfig
from kvstore.tiers.store import TieredStore


class DataPlane(Protocol):
    """The part of kvstore.service.dataplane.DataPlaneServer the daemon uses."""

    @property
    def port(self) -> int | None: ...

    @property
    def unix_path(self) -> str | None: ...

    def stats(self) -> object: ...

    async def start(self) -> None: ...

    async def close(self, drain_timeout_s: float = 10.0) -> None: ...


class InflightRequests:
    """Admin requests being handled now (counted by a middleware from the handler's start).

    aiohttp's own graceful shutdown stops reading request bodies, so a
    request whose body is still arriving would be cut; the daemon instead
    closes its listener, waits here for in-flight requests, then shuts down.
    """

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """True if every in-flight request finished within ``timeout_s``."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


@dataclass(slots=True)
class DaemonState:
    """Lifecycle facts the readiness probe and the status page report.

    Attributes:
        started_at: unix time the daemon started.
        store_open: the store's cleanup context has opened it and not yet closed it.
        data_plane: the running data-plane server, or None (disabled, not yet started, closed).
        draining: a stop signal arrived; the daemon is finishing in-flight work.
        inflight: admin requests being handled now.
        event_subscribers: open ``/v1/events`` streams.
    """

    started_at: float = field(default_factory=time.time)
    store_open: bool = False
    data_plane: DataPlane | None = None
    draining: bool = False
    inflight: InflightRequests = field(default_factory=InflightRequests)
    event_subscribers: int = 0


CONFIG = web.AppKey("config", DaemonConfig)
STATE = web.AppKey("state", DaemonState)
STORE = web.AppKey("store", TieredStore)
METRICS = web.AppKey("metrics", DaemonMetrics)
HISTORY = web.AppKey("history", StatsHistory)
EVENTS = web.AppKey("events", EventFanout)


def snapshot(app: web.Application) -> Snapshot:
    """Store, tier, request and data-plane counters now (blocking; call it in a thread)."""
    dp = app[STATE].data_plane
    return take_snapshot(app[STORE], app[METRICS].requests, dp.stats if dp is not None else None)
