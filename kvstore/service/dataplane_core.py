"""The data plane's configuration and the state its connections share.

:class:`DataPlaneConfig` is the one validated config object of the data
plane. :class:`ServerCore` holds what every connection of one server uses:
the config, the store (through :class:`StoreAccess`), the counters, the lease
book and a small thread pool for operations that may block on a lower tier.
:class:`Reply` is what a request handler returns.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from kvstore.errors import InvalidInput
from kvstore.service.dataplane_sender import OnSent
from kvstore.service.dataplane_session import LeaseBook, Session
from kvstore.service.dataplane_stats import DataPlaneObserver, StatsRecorder
from kvstore.service.dataplane_store import StoreAccess
from kvstore.service.net import is_loopback
from kvstore.service.protocol import MsgType

if TYPE_CHECKING:
    from kvstore.service.migration.inflight import Inflight
    from kvstore.service.migration.peers import PeerService

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DataPlaneConfig:
    """Configuration of the data-plane server.

    Attributes:
        host: TCP bind address. Without ``tokens`` only loopback is allowed.
        port: TCP port; 0 picks a free one (see ``DataPlaneServer.port``).
        unix_path: also serve a Unix socket at this path (mode 0600 without tokens).
        tokens: bearer token -> tenant. Empty: no authentication (loopback only);
            otherwise every connection must HELLO with one, and is bound to its tenant.
        max_payload_bytes: the largest payload one frame may carry.
        max_inflight_bytes: per connection, bytes being received into the store
            plus bytes of replies not yet sent; requests beyond it get BUSY.
        shm: offer the shared-memory path (the CPU arena's /dev/shm file) on the
            Unix socket to peers of the daemon's own uid (SO_PEERCRED).
        frame_timeout_s: a connection that stops sending in the middle of a frame
            for this long gets a BAD_FRAME error and is closed.
        reservation_ttl_s: shared-memory reservations not committed within this are aborted.
        max_pins_per_connection: chunks one connection may hold pinned for shared-memory reads.
        workers: threads for operations that may block on a lower tier (disk, remote).
        tls_cert, tls_key: PEM certificate chain and private key; both set, the TCP
            listener speaks TLS only (the Unix socket stays plain).
    """

    host: str = "127.0.0.1"
    port: int = 7481
    unix_path: str | None = None
    tokens: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    max_payload_bytes: int = 1 << 30
    max_inflight_bytes: int = 2 << 30
    shm: bool = True
    frame_timeout_s: float = 30.0
    reservation_ttl_s: float = 60.0
    max_pins_per_connection: int = 65536
    workers: int = 4
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidInput("tls_cert and tls_key go together: set both or neither")
        if not 0 <= self.port <= 65535:
            raise InvalidInput(f"port must be in [0, 65535], got {self.port}")
        if not self.tokens and not is_loopback(self.host):
            raise InvalidInput(
                f"refusing to bind {self.host!r} without tokens: the data plane serves "
                "loopback only unless every client must present a bearer token"
            )
        for token, tenant in self.tokens.items():
            if not isinstance(token, str) or not token or not isinstance(tenant, str) or not tenant:
                raise InvalidInput("tokens must map non-empty bearer tokens to non-empty tenants")
        if self.max_payload_bytes < 1 or self.max_inflight_bytes < 1:
            raise InvalidInput("max_payload_bytes and max_inflight_bytes must be >= 1")
        if self.frame_timeout_s <= 0 or self.reservation_ttl_s <= 0:
            raise InvalidInput("frame_timeout_s and reservation_ttl_s must be > 0")
        if self.max_pins_per_connection < 1 or self.workers < 1:
            raise InvalidInput("max_pins_per_connection and workers must be >= 1")
        object.__setattr__(self, "tokens", MappingProxyType(dict(self.tokens)))


@dataclass(slots=True)
class Reply:
    """A handler's answer: header, payload buffers (sent without copying) and a callback when sent.

    ``inflight`` bytes are counted against the connection's budget until the
    payload is sent (or the connection is lost).
    """

    header: dict[str, Any]
    payload: list[memoryview] = field(default_factory=list)
    on_sent: OnSent | None = None
    type: MsgType = MsgType.OK
    inflight: int = 0


Result = Reply | Awaitable[Reply]


class ServerCore:
    """State shared by the connections of one data-plane server (event loop thread only)."""

    def __init__(
        self, access: StoreAccess, config: DataPlaneConfig, observer: DataPlaneObserver | None
    ) -> None:
        self.access = access
        self.config = config
        self.stats = StatsRecorder(observer)
        self.leases = LeaseBook()
        self.uid = os.getuid()
        self.draining = False
        self.connections: set[Any] = set()  # the open Connection objects
        self.peers: PeerService | None = None  # peer sharing: a LOOKUP's local miss asks peers
        self.inflight: Inflight | None = None  # announced chunks (ANNOUNCE; a LOOKUP's wait_s)
        self._executor = ThreadPoolExecutor(config.workers, thread_name_prefix="kvstore-dataplane")

    def new_session(self) -> Session:
        return Session(self.access, self.stats, self.config.max_pins_per_connection)

    def offload(self, fn: Callable[[], T]) -> Awaitable[T]:
        """Run a call that may block (a lower tier) on the worker threads."""
        return asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def shm_info(self) -> dict[str, Any] | None:
        arena = self.access.arena
        if not self.config.shm or arena is None or arena.shm_path is None:
            return None
        return {"path": arena.shm_path, "size": arena.capacity_bytes}

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
