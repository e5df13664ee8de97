"""The daemon process: store, data plane and admin API in one asyncio program.

Lifecycle (aiohttp cleanup contexts, opened in this order, closed in reverse):

1. the tiered store (CPU + LMDB disk + optional Redis);
2. metrics: a per-daemon Prometheus registry reading the store;
3. the binary data plane (kvstore.service.dataplane), given the store and
   the metrics' request observer;
4. the history sampler behind the status page.

The admin API's listener opens after all of them. SIGTERM or SIGINT starts a
graceful stop: the admin listener closes and in-flight admin requests finish,
the data plane drains in-flight requests (``drain_timeout_s``), background
writes to lower tiers are flushed, and the store closes. Logs are JSON, one
object per line on stderr.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from kvstore.builder import build_store
from kvstore.connectors.vllm_events import EventFanout
from kvstore.errors import KVStoreError
from kvstore.service.admin import make_admin_app
from kvstore.service.admin_history import StatsHistory, sample_forever
from kvstore.service.admin_metrics import DaemonMetrics
from kvstore.service.admin_state import (
    CONFIG,
    EVENTS,
    HISTORY,
    METRICS,
    STATE,
    STORE,
    DaemonState,
    DataPlane,
    snapshot,
)
from kvstore.service.config import DaemonConfig, LoggingConfig
from kvstore.service.migration.inflight import Inflight, InflightLimits
from kvstore.service.migration.transfer_registry import transfers_ctx_for

if TYPE_CHECKING:
    from kvstore.service.migration.peers import PeerService

log = logging.getLogger("kvstore.daemon")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, the record's ``fields``, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(config: LoggingConfig) -> None:
    """Route every logger through one stderr handler with the JSON formatter."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())


def event(msg: str, level: int = logging.INFO, **fields: object) -> None:
    log.log(level, msg, extra={"fields": fields})


class JsonAccessLogger(AbstractAccessLogger):
    """One structured line per admin request (never the Authorization header)."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            "request",
            extra={
                "fields": {
                    "method": request.method,
                    "path": request.path,
                    "status": response.status,
                    "seconds": round(time, 6),
                    "remote": request.remote,
                }
            },
        )


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the store; on the way out flush background writes, then close it."""
    config = app[CONFIG]
    dp = config.data_plane
    shm = config.tiers.shared_memory or (dp.enabled and dp.shm and dp.unix_path is not None)
    tiers = dataclasses.replace(config.tiers, shared_memory=shm)  # the shm path maps the CPU arena
    fanout = EventFanout()
    store = await asyncio.to_thread(build_store, tiers, config.store, fanout)
    app[STORE] = store
    app[EVENTS] = fanout
    app[STATE].store_open = True
    event("store open", tiers=[t.name for t in store.tiers], data_dir=config.tiers.data_dir)
    yield
    app[STATE].store_open = False
    started = time.monotonic()
    await asyncio.to_thread(store.flush)
    await asyncio.to_thread(store.close)
    event("store closed", flush_s=round(time.monotonic() - started, 3))


async def metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    """A per-daemon registry whose collector reads the store at every scrape."""
    metrics = DaemonMetrics()
    metrics.watch(lambda: snapshot(app))
    app[METRICS] = metrics
    yield


def _make_dataplane(app: web.Application, peers: PeerService | None = None,
                    inflight: Inflight | None = None) -> DataPlane:
    """The data-plane server for this app's store and config (imported only when enabled)."""
    from kvstore.service.dataplane import DataPlaneConfig, make_dataplane

    config = app[CONFIG]
    dp = config.data_plane
    settings = DataPlaneConfig(
        host=dp.host,
        port=dp.port,
        unix_path=dp.unix_path,
        tokens=config.auth.data_plane_tokens(),
        max_payload_bytes=dp.max_payload_bytes,
        max_inflight_bytes=dp.max_inflight_bytes,
        shm=dp.shm,
        tls_cert=dp.tls_cert,
        tls_key=dp.tls_key,
    )
    return make_dataplane(app[STORE], settings, metrics=app[METRICS].requests, peers=peers, inflight=inflight)


def _make_inflight(app: web.Application) -> Inflight:
    """The daemon's one registry of announced chunks (ANNOUNCE), fed by its store's events."""
    dp = app[CONFIG].data_plane
    inflight = Inflight(InflightLimits(dp.handoff_max_keys, dp.handoff_max_ttl_s, dp.handoff_max_wait_s))
    app[EVENTS].attach(inflight)
    return inflight


def _make_peers(app: web.Application) -> PeerService | None:
    """Peer sharing's service when configured (docs/peers.md); its metrics join the registry."""
    config = app[CONFIG]
    peer_config = config.data_plane.peers
    if peer_config is None:
        return None
    from kvstore.service.migration.peers import PeerCollector, PeerService

    own: dict[str, str] = {}
    for token, tenant in config.auth.data_plane_tokens().items():
        own.setdefault(tenant, token)  # a tenant's own token is presented to peers for it
    service = PeerService(app[STORE], app[EVENTS], peer_config, own)
    app[METRICS].registry.register(PeerCollector(service))
    return service


async def dataplane_ctx(app: web.Application) -> AsyncIterator[None]:
    """Start the data plane; on the way out drain its in-flight requests, then close it."""
    config = app[CONFIG].data_plane
    if not config.enabled:
        yield
        return
    peers = _make_peers(app)
    inflight = _make_inflight(app)
    server = _make_dataplane(app, peers, inflight)
    try:
        await server.start()
    except BaseException:
        app[EVENTS].detach(inflight)
        if peers is not None:
            await peers.close()
        raise
    app[STATE].data_plane = server
    event("data plane listening", host=config.host, port=server.port, unix_path=server.unix_path)
    if peers is not None:
        await peers.start(config.host, int(server.port or 0))
        event("peer sharing on", peer_id=peers.peer_id, address=peers.address)
    yield
    app[STATE].data_plane = None
    started = time.monotonic()
    await server.close(drain_timeout_s=config.drain_timeout_s)
    app[EVENTS].detach(inflight)
    if peers is not None:
        await peers.close()
    event("data plane closed", drain_s=round(time.monotonic() - started, 3))


async def history_ctx(app: web.Application) -> AsyncIterator[None]:
    """Sample the counters into the status page's ring buffer until shutdown."""
    admin = app[CONFIG].admin
    app[HISTORY] = history = StatsHistory(admin.history_interval_s, admin.history_samples)
    task = asyncio.create_task(sample_forever(history, lambda: snapshot(app)))
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def build_app(config: DaemonConfig) -> web.Application:
    """The daemon's aiohttp application: admin routes plus the resources' cleanup contexts."""
    app = make_admin_app(config)
    app[STATE] = DaemonState()
    app.cleanup_ctx.extend([store_ctx, metrics_ctx, dataplane_ctx, history_ctx])
    app.cleanup_ctx.append(transfers_ctx_for(config.data_plane.transfer_tls_ca))
    return app


async def serve(config: DaemonConfig, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set (by SIGTERM/SIGINT when not given), then stop gracefully.

    Raises:
        OSError: a listener could not bind; KVStoreError, ValueError: a component refused its config.
    """
    stop = stop or _stop_on_signals()
    app = build_app(config)
    access = logging.getLogger("kvstore.access") if config.logging.access_log else None
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=config.admin.shutdown_timeout_s,
        access_log_class=JsonAccessLogger,
        access_log=access,
    )
    try:
        await runner.setup()
        site = web.TCPSite(runner, config.admin.host, config.admin.port)
        await site.start()
        event("admin listening", host=config.admin.host, port=_bound_port(runner), pid=os.getpid())
        event("ready")
        await stop.wait()
        await _drain_admin(app, site, config.admin.shutdown_timeout_s)
    finally:
        await runner.cleanup()  # closes idle connections, then the cleanup contexts in reverse
    event("stopped")


async def _drain_admin(app: web.Application, site: web.TCPSite, timeout_s: float) -> None:
    """Stop accepting connections, then let in-flight admin requests finish (bodies included)."""
    state = app[STATE]
    state.draining = True
    event("stopping: draining in-flight requests", admin_inflight=state.inflight.count)
    await site.stop()
    if not await state.inflight.wait_idle(timeout_s):
        event(
            "admin requests still running after the drain timeout",
            logging.WARNING,
            admin_inflight=state.inflight.count,
        )


def _bound_port(runner: web.AppRunner) -> int | None:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    return None


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        event("signal received", signal=sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return stop


def run(config: DaemonConfig) -> int:
    """``kvstore serve``: configure logs, run the daemon, return the exit code.

    0 after a graceful stop; 1 when a resource cannot be opened (a port in use, an
    unopenable directory); 2 when a component refuses its configuration.
    """
    configure_logging(config.logging)
    event("starting", config=config.redacted())
    try:
        asyncio.run(serve(config))
    except (OSError, RuntimeError, KVStoreError, ValueError) as e:
        event("failed", logging.ERROR, error=str(e), kind=type(e).__name__)
        print(f"kvstore: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    return 0
