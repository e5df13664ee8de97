"""The data-plane server: the binary protocol (docs/protocol.md) over TCP and a Unix socket.

Usage (the daemon starts it inside its aiohttp lifecycle)::

    server = make_dataplane(store, DataPlaneConfig(port=7481, unix_path="/run/kvstore.sock"))
    await server.start()
    ...
    await server.close(drain_timeout_s=10.0)

The file list shows the data flow: ``dataplane_reader`` splits the byte stream
into frames and receives payloads straight into their destination,
``dataplane_conn`` answers each frame, ``dataplane_handlers`` and
``dataplane_put`` implement the requests against the store through
``dataplane_store`` (namespace checks, reservations, pins), ``dataplane_session``
records what a connection holds, ``dataplane_sender`` writes replies without
copying, ``dataplane_core`` holds the config and the state connections share,
``dataplane_stats`` counts, and ``dataplane_main`` runs a server as a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING

from kvstore.service.dataplane_conn import Connection
from kvstore.service.dataplane_core import DataPlaneConfig, ServerCore
from kvstore.service.dataplane_stats import DataPlaneObserver, DataPlaneStats
from kvstore.service.dataplane_store import StoreAccess
from kvstore.service.migration.tls import server_context
from kvstore.tiers.store import TieredStore

if TYPE_CHECKING:
    from kvstore.service.migration.inflight import Inflight
    from kvstore.service.migration.peers import PeerService

__all__ = ["DataPlaneConfig", "DataPlaneObserver", "DataPlaneServer", "DataPlaneStats", "make_dataplane"]

log = logging.getLogger("kvstore.dataplane")
TICK_S = 0.5


class DataPlaneServer:
    """Serves one tiered store over TCP (and a Unix socket when configured).

    Lifecycle: :meth:`start` binds and serves; :meth:`close` stops accepting,
    lets requests already read finish (up to the drain timeout), then closes
    every connection, which gives back everything it held. The store is the
    caller's: the server neither opens nor closes it.
    """

    def __init__(
        self, store: TieredStore, config: DataPlaneConfig, metrics: DataPlaneObserver | None = None,
        peers: PeerService | None = None, inflight: Inflight | None = None,
    ) -> None:
        self.config = config
        self._core = ServerCore(StoreAccess(store), config, metrics)
        self._core.peers = peers
        self._core.inflight = inflight
        self._servers: list[asyncio.AbstractServer] = []
        self._port = 0
        self._ticker: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def port(self) -> int:
        """The bound TCP port (the one picked when configured with 0)."""
        return self._port

    @property
    def unix_path(self) -> str | None:
        return self.config.unix_path

    def stats(self) -> DataPlaneStats:
        return self._core.stats.snapshot()

    async def start(self) -> None:
        """Bind the TCP listener (and the Unix socket) and start serving.

        Raises:
            OSError: an address is in use or cannot be bound.
        """
        loop = asyncio.get_running_loop()
        core = self._core
        tls = None
        if self.config.tls_cert is not None and self.config.tls_key is not None:
            tls = server_context(self.config.tls_cert, self.config.tls_key)
        tcp = await loop.create_server(
            lambda: Connection(core, unix=False), self.config.host, self.config.port, ssl=tls
        )
        self._servers.append(tcp)
        self._port = int(tcp.sockets[0].getsockname()[1])
        if self.config.unix_path is not None:
            try:
                unix = await loop.create_unix_server(
                    lambda: Connection(core, unix=True), self.config.unix_path
                )
            except BaseException:
                tcp.close()
                raise
            os.chmod(self.config.unix_path, 0o666 if self.config.tokens else 0o600)
            self._servers.append(unix)
        self._ticker = loop.create_task(self._tick())
        log.info(
            "data plane on %s:%d%s",
            self.config.host,
            self._port,
            f" and {self.config.unix_path}" if self.config.unix_path else "",
        )

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish (at most ``drain_timeout_s``), then close.

        New requests on open connections are answered SHUTTING_DOWN meanwhile. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        core = self._core
        core.draining = True
        for server in self._servers:
            server.close()
        deadline = time.monotonic() + drain_timeout_s
        while any(not c.quiet for c in core.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(core.connections):
            conn.close()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for server in self._servers:
            await server.wait_closed()
        if self.config.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.unix_path)
        await asyncio.get_running_loop().run_in_executor(None, core.shutdown)

    async def _tick(self) -> None:
        """Every TICK_S: stalled frames, expired reservations, lapsed lease records."""
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for conn in list(self._core.connections):
                conn.check_timeouts(now)
            self._core.leases.prune(now)


def make_dataplane(
    store: TieredStore, config: DataPlaneConfig, metrics: DataPlaneObserver | None = None,
    peers: PeerService | None = None, inflight: Inflight | None = None,
) -> DataPlaneServer:
    """A data-plane server over ``store`` (``peers``: lookups that miss ask peers; ``inflight``: announced
    chunks, fed by the store's events, that lookups may wait for); then ``await server.start()``."""
    return DataPlaneServer(store, config, metrics, peers, inflight)
