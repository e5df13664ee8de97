"""Peer sharing's validated settings, read from the ``peer_*`` fields of the data-plane section.

Peer sharing is off unless ``peer_index_url`` names a Redis (or Redis
Cluster) server. :meth:`PeerConfig.from_settings` validates the fields
(raising ``ValueError``, as every config section does) and returns None when
the feature is off. Deployment guide: docs/peers.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

_TOKEN = re.compile(r"^[A-Za-z0-9._~+/=-]{16,256}$")
_PEER_ID = re.compile(r"^[A-Za-z0-9._:@\[\]-]{1,128}$")
_PREFIX = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_WILDCARDS = ("0.0.0.0", "::", "")


class PeerFields(Protocol):
    """The data-plane settings peer sharing reads (``DataPlaneSettings`` has them)."""

    @property
    def enabled(self) -> bool: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def peer_index_url(self) -> str | None: ...
    @property
    def peer_cluster(self) -> bool: ...
    @property
    def peer_index_prefix(self) -> str: ...
    @property
    def peer_advertise(self) -> str | None: ...
    @property
    def peer_token(self) -> str | None: ...
    @property
    def peer_id(self) -> str | None: ...
    @property
    def peer_timeout_s(self) -> float: ...
    @property
    def peer_ttl_s(self) -> float: ...
    @property
    def peer_max_chunks(self) -> int: ...


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """Peer sharing: where the shared index lives and how this daemon appears in it.

    Invariant: ``heartbeat_s`` is a third of ``ttl_s``, so an entry outlives two
    lost heartbeats and vanishes within ``ttl_s`` of the daemon's death.

    Attributes:
        index_url: ``redis://``, ``rediss://`` or ``unix://`` URL of the index (Redis or Valkey).
        cluster: the URL names one node of a Redis Cluster.
        prefix: first part of every index key (several peer groups may share one Redis).
        advertise: ``host:port`` other daemons reach this data plane at; None: the
            data plane's bind address and bound port (a wildcard bind needs it set).
        token: bearer token presented to peers for a tenant this daemon has no token
            of its own for (never shown in ``repr``).
        peer_id: this daemon's name in the index; None: the advertised address.
        timeout_s: bound on one lookup's work with peers (index queries and pulls).
        ttl_s: an entry expires this long after the daemon's last heartbeat.
        max_chunks: chunks beyond the local hit asked of the index per lookup.
    """

    index_url: str
    cluster: bool = False
    prefix: str = "kvstore:peers"
    advertise: str | None = None
    token: str | None = field(default=None, repr=False)
    peer_id: str | None = None
    timeout_s: float = 2.0
    ttl_s: float = 15.0
    max_chunks: int = 512

    def __post_init__(self) -> None:
        if not self.index_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("data_plane.peer_index_url must be a redis://, rediss:// or unix:// URL")
        if not _PREFIX.match(self.prefix):
            raise ValueError("data_plane.peer_index_prefix must be 1-64 characters of [A-Za-z0-9._:-]")
        if self.advertise is not None:
            split_address(self.advertise)
        if self.token is not None and not _TOKEN.match(self.token):
            raise ValueError("data_plane.peer_token must be 16-256 characters of [A-Za-z0-9._~+/=-]")
        if self.peer_id is not None and not _PEER_ID.match(self.peer_id):
            raise ValueError("data_plane.peer_id must be 1-128 characters of [A-Za-z0-9._:@[]-]")
        if not 0 < self.timeout_s <= 600:
            raise ValueError(f"data_plane.peer_timeout_s must be in (0, 600], got {self.timeout_s}")
        if not 0.3 <= self.ttl_s <= 86400:
            raise ValueError(f"data_plane.peer_ttl_s must be in [0.3, 86400], got {self.ttl_s}")
        if not 1 <= self.max_chunks <= 65536:
            raise ValueError(f"data_plane.peer_max_chunks must be in [1, 65536], got {self.max_chunks}")

    @property
    def heartbeat_s(self) -> float:
        return self.ttl_s / 3

    @staticmethod
    def from_settings(dp: PeerFields) -> PeerConfig | None:
        """The peer settings of a data-plane section; None when ``peer_index_url`` is unset.

        Raises:
            ValueError: a bad field, peer sharing without the data plane, or a
                wildcard bind without ``peer_advertise``.
        """
        if not dp.peer_index_url:
            return None
        if not dp.enabled:
            raise ValueError("peer sharing (data_plane.peer_index_url) needs the data plane enabled")
        if dp.peer_advertise is None and dp.host in _WILDCARDS:
            raise ValueError(
                f"data_plane.host {dp.host!r} is a wildcard: set data_plane.peer_advertise to the "
                "host:port other daemons reach this one at"
            )
        return PeerConfig(
            index_url=dp.peer_index_url, cluster=dp.peer_cluster, prefix=dp.peer_index_prefix,
            advertise=dp.peer_advertise, token=dp.peer_token, peer_id=dp.peer_id,
            timeout_s=dp.peer_timeout_s, ttl_s=dp.peer_ttl_s, max_chunks=dp.peer_max_chunks,
        )  # fmt: skip

    def address(self, host: str, port: int) -> str:
        """The advertised ``host:port``, given the data plane's bind host and bound port."""
        if self.advertise is not None:
            return self.advertise
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def name(self, address: str) -> str:
        return self.peer_id or address


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) -> (host, port).

    Raises:
        ValueError: no host, or a port outside 1-65535.
    """
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"a peer address is host:port with a port in 1-65535, got {address!r}")
    return host, int(port)
