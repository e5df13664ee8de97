"""Configuration of the remote tier: which Redis/Valkey, what budget, which limits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from urllib.parse import urlparse

from kvstore.tiers.record import HEADER_BYTES

#: Redis' default proto-max-bulk-len bounds one value (header + payload)
MAX_VALUE_BYTES = 512 << 20


@dataclass(frozen=True, slots=True)
class RemoteTierConfig:
    """How the remote tier reaches Redis/Valkey and what it may store there.

    Attributes:
        url: ``redis://[user:pass@]host:port/db``, ``rediss://`` (TLS) or
            ``unix:///path/redis.sock?db=N``; in Cluster mode any one node.
        capacity_bytes: local budget for the bytes (header + payload) this tier
            wrote; past it the tier deletes its own least recently used writes.
            Redis may drop values sooner (maxmemory policy, TTL, other
            clients): a vanished key is a miss, EVICTED if this tier wrote it,
            EXPIRED if its TTL ran out, else ABSENT.
        cluster: use Redis Cluster (redis.cluster.RedisCluster); the other
            nodes are discovered from ``url``.
        key_prefix: start of every Redis key; tiers with other prefixes never
            meet. No ``{`` or ``}``: a hash tag would put every chunk in one slot.
        ttl_s: expiry of each value (SET PX), or None to keep values until
            deleted or evicted by Redis.
        socket_timeout_s: limit on one socket read or write; a stalled server
            is declared down after it.
        connect_timeout_s: limit on opening one connection.
        retry_interval_s: after a failure the tier fails fast this long, then
            tries Redis again by itself.
        max_connections: connections per Redis node (a blocking pool).
        parallelism: worker threads, each with its own connection, that move
            the round trips of one batched get or put.
        max_chunk_bytes: largest payload a put accepts (ChunkTooLarge beyond).
    """

    url: str
    capacity_bytes: int
    cluster: bool = False
    key_prefix: str = "kvs:"
    ttl_s: float | None = None
    socket_timeout_s: float = 5.0
    connect_timeout_s: float = 1.0
    retry_interval_s: float = 2.0
    max_connections: int = 16
    parallelism: int = 4
    max_chunk_bytes: int = 128 << 20

    def __post_init__(self) -> None:
        scheme = urlparse(self.url).scheme if isinstance(self.url, str) else ""
        if scheme not in ("redis", "rediss", "unix") or (self.cluster and scheme == "unix"):
            raise ValueError(f"url must be redis://, rediss:// or (standalone) unix://, got {self.url!r}")
        _positive_int("capacity_bytes", self.capacity_bytes)
        _positive_int("max_connections", self.max_connections)
        _positive_int("parallelism", self.parallelism)
        _positive_int("max_chunk_bytes", self.max_chunk_bytes)
        if self.max_chunk_bytes > MAX_VALUE_BYTES - HEADER_BYTES:
            raise ValueError(f"max_chunk_bytes must be <= {MAX_VALUE_BYTES - HEADER_BYTES}")
        if self.parallelism > self.max_connections:
            raise ValueError("parallelism needs as many connections: parallelism <= max_connections")
        if not isinstance(self.key_prefix, str) or not self.key_prefix or set("{}") & set(self.key_prefix):
            raise ValueError(f"key_prefix must be non-empty, without '{{' or '}}': got {self.key_prefix!r}")
        for name in ("socket_timeout_s", "connect_timeout_s"):
            _duration(name, getattr(self, name), minimum=1e-3)
        _duration("retry_interval_s", self.retry_interval_s, minimum=0.0)
        if self.ttl_s is not None:
            _duration("ttl_s", self.ttl_s, minimum=1e-3)

    @property
    def ttl_ms(self) -> int | None:
        """The TTL as Redis' PX argument."""
        return None if self.ttl_s is None else max(1, round(self.ttl_s * 1000))


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _duration(name: str, value: object, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
