"""Connections to peers kept across transfers: one pool per daemon, keyed by peer URL and token.

Opening a transfer's connection costs round trips (TCP, TLS, HELLO,
REGISTER); a transfer that finds an idle connection to the same peer with
the same token (and TLS settings) skips them and starts with HAVE. A
:class:`PeerSession` is owned by one transfer at a time (taken, then given
back or closed): transfers never share a connection, so one transfer's
acknowledgements never time another's chunks. A session that saw an error is
closed, never pooled. The namespaces registered on a session's connection
are remembered with it and forgotten when the connection is replaced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvstore.client._aio_conn import AsyncConn
from kvstore.client.aio import AsyncClient
from kvstore.errors import InvalidInput
from kvstore.keys import NamespaceId


@dataclass(frozen=True, slots=True)
class PeerKey:
    """What a pooled connection is for: the peer, the token it was greeted with, TLS, the request timeout."""

    url: str
    token: str | None
    tls: bool = False
    tls_ca: str | None = None
    timeout_s: float = 30.0


@dataclass(slots=True)
class PeerSession:
    """One transfer's client of a peer (a single pipelined connection).

    Invariant: ``registered`` names namespaces registered on ``conn``, and ``conn`` is the
    connection they were registered on (a new connection starts with none).
    """

    key: PeerKey
    client: AsyncClient
    conn: AsyncConn | None = None
    registered: set[NamespaceId] = field(default_factory=set)
    reused: bool = False
    rtt_s: float = math.inf  # the quickest round trip seen on this session (a HAVE)

    @classmethod
    def open(cls, key: PeerKey, verify: bool = False) -> PeerSession:
        client = AsyncClient(key.url, token=key.token, timeout_s=key.timeout_s, retries=0, pool_size=1, use_shm=False,
                             verify=verify, tls=key.tls, tls_ca=key.tls_ca)  # fmt: skip
        return cls(key, client)

    def on(self, conn: AsyncConn) -> None:
        """The connection now in use; namespaces registered on another one no longer count."""
        if conn is not self.conn:
            self.conn, self.registered = conn, set()

    @property
    def alive(self) -> bool:
        return self.conn is not None and not self.conn.closed

    async def close(self) -> None:
        await self.client.close()


class PeerPool:
    """Idle sessions per :class:`PeerKey` (at most ``max_idle`` each). Event-loop thread only."""

    def __init__(self, max_idle: int = 2) -> None:
        if max_idle < 0:
            raise InvalidInput("max_idle must be >= 0")
        self.max_idle = max_idle
        self._idle: dict[PeerKey, list[PeerSession]] = {}
        self._closed = False

    async def take(self, key: PeerKey) -> PeerSession:
        """An idle session with a live connection to ``key``, or a new one (connected on first use)."""
        idle = self._idle.get(key, [])
        while idle:
            session = idle.pop()
            if session.alive:
                session.reused = True
                return session
            await session.close()
        return PeerSession.open(key)

    async def give_back(self, session: PeerSession) -> None:
        """Keep a healthy session for the next transfer (closed when the pool is full or closed)."""
        idle = self._idle.setdefault(session.key, [])
        if self._closed or not session.alive or len(idle) >= self.max_idle:
            await session.close()
            return
        idle.append(session)

    def idle_count(self, key: PeerKey | None = None) -> int:
        return sum(len(v) for k, v in self._idle.items() if key is None or k == key)

    async def close(self) -> None:
        self._closed = True
        sessions = [s for v in self._idle.values() for s in v]
        self._idle.clear()
        for session in sessions:
            await session.close()

