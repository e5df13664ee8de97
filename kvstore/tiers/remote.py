"""The remote tier: chunks in Redis or Valkey, standalone or Cluster.

Layout: each chunk is one Redis string under ``key_prefix + key.hex()``,
holding the 104-byte record header (kvstore.tiers.record) then the payload.
Chunk keys are derived from their namespace, so two tenants never share a
Redis key; the header repeats the namespace so that ``keys(ns)`` and
``clear(ns)`` filter a SCAN of the prefix by reading headers only (GETRANGE).
No index set is kept, so nothing goes stale when Redis expires or evicts a
value. Keys carry no hash tag: in Cluster mode chunks spread over all slots.

Data path: values travel on redis-py's pooled connections, framed here. A SET
sends header and payload as two pieces of one bulk string (the payload is not
copied on the client) and a GET receives the payload straight into the
caller's buffer (``recv_into``), then checks its XXH3-128. Small commands,
pools, AUTH/SELECT and Cluster topology are plain redis-py.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import urlparse

import numpy as np
import redis
from redis import exceptions as rex
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.connection import BlockingConnectionPool, ConnectionPool
from redis.retry import Retry

from kvstore.buffers import U8, as_u8
from kvstore.checksum import checksum, copy_with_checksum
from kvstore.errors import ChunkCorrupt, ChunkTooLarge, InvalidInput, RemoteUnavailable
from kvstore.keys import KEY_BYTES, ChunkKey, NamespaceId
from kvstore.tiers.base import ChunkMeta, MissReason, Tier, TierStats, register_tier
from kvstore.tiers.record import HEADER_BYTES, RecordHeader

log = logging.getLogger(__name__)

#: Redis' default proto-max-bulk-len bounds one value (header + payload)
MAX_VALUE_BYTES = 512 << 20
_BATCH_BYTES = 8 << 20  # value bytes per pipelined round trip (at least one value)
_SCAN_COUNT = 512
_READ_BYTES = 64 << 10  # reply-line buffer; payloads bypass it
_SMALL = 64 << 10  # payloads below this are joined into the command bytes
_GLOB = str.maketrans({c: "\\" + c for c in "*?[]\\"})
_DOWN = (rex.ConnectionError, rex.TimeoutError, rex.ClusterError, rex.RedisClusterException)

Client = redis.Redis | RedisCluster


class _Conn(Protocol):
    """The part of a redis-py connection the framed data path uses (redis-py leaves it untyped)."""

    def send_packed_command(self, command: Sequence[bytes | memoryview]) -> None: ...

    def pack_commands(self, commands: list[tuple[str, bytes]]) -> list[bytes]: ...

    def read_response(self) -> object: ...

    def disconnect(self) -> None: ...


R = TypeVar("R")
J = TypeVar("J")


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


@dataclass(frozen=True, slots=True)
class _Got:
    """A verified record: its header and the caller memory now holding the payload."""

    header: RecordHeader
    data: U8


class _Redirect:
    """A Cluster MOVED/ASK reply: redis-py redoes the command and learns the new slot map."""


_REDIRECT = _Redirect()
Outcome = _Got | MissReason
Dest = Callable[[int], U8 | None]


@dataclass(frozen=True, slots=True)
class _ReadJob:
    key: ChunkKey
    rkey: bytes
    dest: Dest  # memory for a payload of n bytes, or None if it does not fit


@dataclass(frozen=True, slots=True)
class _WriteJob:
    key: ChunkKey
    rkey: bytes
    header: bytes
    payload: U8
    meta: ChunkMeta

    @property
    def size(self) -> int:
        return HEADER_BYTES + self.payload.size


@dataclass(slots=True)
class _Written:
    """What this tier remembers of a value it wrote (its budget accounting)."""

    size: int
    meta: ChunkMeta
    deadline: float | None


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def _set_command(job: _WriteJob, ttl_ms: int | None) -> list[bytes | memoryview]:
    """RESP for SET rkey header+payload [PX ms], the payload as its own piece."""
    opts = [b"PX", b"%d" % ttl_ms] if ttl_ms else []
    head = b"*%d\r\n" % (3 + len(opts)) + _bulk(b"SET") + _bulk(job.rkey) + b"$%d\r\n" % job.size
    return [head + job.header, job.payload.data, b"\r\n" + b"".join(map(_bulk, opts))]


def _coalesce(pieces: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """Join runs of small pieces so that only large payloads are sent on their own."""
    out: list[bytes | memoryview] = []
    run: list[bytes | memoryview] = []
    for piece in pieces:
        if len(piece) < _SMALL:
            run.append(piece)
            continue
        if run:
            out.append(b"".join(run))
            run = []
        out.append(piece)
    if run:
        out.append(b"".join(run))
    return out


class _Replies:
    """Reads RESP replies from a socket; bulk payloads land straight in caller memory."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray(_READ_BYTES)
        self._lo = self._hi = 0

    def _fill(self) -> None:
        if self._lo == self._hi:
            self._lo = self._hi = 0
        elif self._hi == len(self._buf):
            if self._lo == 0:
                raise rex.ConnectionError("reply line longer than the read buffer")
            self._buf[: self._hi - self._lo] = self._buf[self._lo : self._hi]
            self._lo, self._hi = 0, self._hi - self._lo
        n = self._sock.recv_into(memoryview(self._buf)[self._hi :])
        if n == 0:
            raise rex.ConnectionError("the server closed the connection")
        self._hi += n

    def line(self) -> bytes:
        while (end := self._buf.find(b"\r\n", self._lo, self._hi)) < 0:
            self._fill()
        line = bytes(self._buf[self._lo : end])
        self._lo = end + 2
        return line

    def into(self, dst: memoryview) -> None:
        have = min(self._hi - self._lo, len(dst))
        dst[:have] = self._buf[self._lo : self._lo + have]
        self._lo += have
        while have < len(dst):
            n = self._sock.recv_into(dst[have:])
            if n == 0:
                raise rex.ConnectionError("the server closed the connection")
            have += n

    def skip(self, n: int) -> None:
        while n:
            if self._lo == self._hi:
                self._fill()
            take = min(n, self._hi - self._lo)
            self._lo += take
            n -= take

    def exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self.into(memoryview(buf))
        return bytes(buf)


def _recv_record(replies: _Replies, job: _ReadJob) -> Outcome | _Redirect:
    """Read one GET reply, checking header, length and checksum before reporting a hit."""
    line = replies.line()
    if line.startswith((b"-MOVED", b"-ASK")):
        return _REDIRECT
    if line.startswith(b"-WRONGTYPE"):
        return MissReason.CORRUPT
    if line in (b"$-1", b"_"):
        return MissReason.ABSENT
    if not line.startswith(b"$") or not line[1:].isdigit():
        raise rex.ConnectionError(f"unexpected reply to GET: {line[:120]!r}")
    size = int(line[1:])
    if size < HEADER_BYTES:
        replies.skip(size + 2)
        return MissReason.CORRUPT
    raw = replies.exact(HEADER_BYTES)
    payload_len = size - HEADER_BYTES
    try:
        header = RecordHeader.unpack(raw, job.key)
    except ChunkCorrupt:
        header = None
    if header is None or header.payload_len != payload_len:
        replies.skip(payload_len + 2)
        return MissReason.CORRUPT
    out = job.dest(payload_len)
    if out is None:
        replies.skip(payload_len + 2)
        return MissReason.TOO_SMALL
    replies.into(out.data)
    if replies.exact(2) != b"\r\n":
        raise rex.ConnectionError("bulk reply not terminated by CRLF")
    return _Got(header, out) if checksum(out) == header.checksum else MissReason.CORRUPT


def _parse_value(raw: object, job: _ReadJob) -> Outcome:
    """Check a whole value fetched by redis-py and copy its payload out while hashing it."""
    if raw is None:
        return MissReason.ABSENT
    if not isinstance(raw, bytes) or len(raw) < HEADER_BYTES:
        return MissReason.CORRUPT
    try:
        header = RecordHeader.unpack(memoryview(raw)[:HEADER_BYTES], job.key)
    except ChunkCorrupt:
        return MissReason.CORRUPT
    if header.payload_len != len(raw) - HEADER_BYTES:
        return MissReason.CORRUPT
    out = job.dest(header.payload_len)
    if out is None:
        return MissReason.TOO_SMALL
    src = np.frombuffer(raw, dtype=np.uint8, offset=HEADER_BYTES)
    return _Got(header, out) if copy_with_checksum(src, out) == header.checksum else MissReason.CORRUPT


def _socket_of(conn: _Conn) -> socket.socket:
    sock = getattr(conn, "_sock", None)  # redis-py keeps the connected socket here
    if not isinstance(sock, socket.socket):
        raise rex.ConnectionError("connection has no socket")
    return sock


def _fits(out: U8) -> Dest:
    return lambda n: out[:n] if n <= out.size else None


def _fresh(n: int) -> U8:
    return np.empty(n, dtype=np.uint8)


class RemoteTier(Tier):
    """Chunks in Redis/Valkey, shared by every process that uses the same prefix.

    Invariants:
      * every value this tier writes is ``RecordHeader + payload`` whose
        checksum was verified against ``meta.checksum`` before sending;
      * a read hands out bytes only after the header (its key, its length)
        and the payload's XXH3-128 match; otherwise it counts a CORRUPT miss
        and deletes the value;
      * ``used_bytes`` is the sum of ``_written`` (values this instance wrote,
        least recently used first) and never exceeds ``capacity_bytes``;
      * after a connection error or timeout the tier is down until
        ``_retry_at``: data-path calls (get, contains, count_leading, put)
        then answer at once with a REMOTE_DOWN miss or a rejected put and
        never raise a Redis error; the first call after the back-off tries again;
      * Redis values cannot be pinned: ``pin`` is ``contains`` and ``unpin``
        a no-op, so leases protect chunks only in local tiers.

    The tier owns its client, connection pools and worker threads; ``close``
    releases them.
    """

    kind = "redis"
    shared = True

    def __init__(self, config: RemoteTierConfig, name: str = "redis") -> None:
        """Create the tier and try Redis once; an unreachable Redis leaves it down, not failed.

        Raises:
            InvalidInput: non-positive budget (see RemoteTierConfig for the rest).
        """
        super().__init__(name, config.capacity_bytes)
        self.config = config
        self._prefix = config.key_prefix.encode()
        self._pattern = config.key_prefix.translate(_GLOB) + "*"
        self._client: Client | None = None
        self._down = False
        self._retry_at = 0.0
        self._closed = False
        self._written: OrderedDict[ChunkKey, _Written] = OrderedDict()
        self._deadlines: deque[tuple[float, ChunkKey]] = deque()
        self._workers = ThreadPoolExecutor(config.parallelism, thread_name_prefix=f"kvs-{name}")
        self.ping()

    # ---- connection state -------------------------------------------------

    def _connect(self) -> Client:
        c = self.config
        opts: dict[str, object] = {
            "socket_timeout": c.socket_timeout_s,
            "socket_connect_timeout": c.connect_timeout_s,
            "max_connections": c.max_connections,
            "timeout": c.socket_timeout_s + c.connect_timeout_s,  # wait for a pooled connection
            # one immediate retry reconnects a pooled connection the server closed
            "retry": Retry(NoBackoff(), 1, supported_errors=(rex.ConnectionError,)),
        }
        if c.cluster:
            return RedisCluster.from_url(c.url, connection_pool_class=BlockingConnectionPool, **opts)
        return redis.Redis(connection_pool=BlockingConnectionPool.from_url(c.url, **opts))

    def _client_now(self) -> Client:
        with self._lock:
            if self._closed:
                raise RemoteUnavailable(f"tier {self.name!r} is closed")
            if time.monotonic() < self._retry_at:
                raise RemoteUnavailable(f"tier {self.name!r} is down; retrying after the back-off")
            if self._client is None:
                try:
                    self._client = self._connect()
                except _DOWN as exc:
                    self._failed(exc)
                    raise RemoteUnavailable(f"tier {self.name!r}: {exc}") from exc
            return self._client

    def _failed(self, exc: BaseException) -> None:
        c = self.config
        with self._lock:
            client, self._client = self._client, None
            first = not self._down
            self._down = True
            self._retry_at = time.monotonic() + c.retry_interval_s
        if first:
            log.warning("remote tier %r is down (%s); retry in %.1f s", self.name, exc, c.retry_interval_s)
        _close_client(client)

    def _ok(self) -> None:
        if self._down:
            with self._lock:
                self._down = False
            log.info("remote tier %r is reachable again", self.name)

    def _call(self, fn: Callable[[Client], R]) -> R:
        """Run ``fn``; a connection problem marks the tier down and raises RemoteUnavailable."""
        client = self._client_now()
        try:
            result = fn(client)
        except _DOWN as exc:
            self._failed(exc)
            raise RemoteUnavailable(f"tier {self.name!r}: {exc}") from exc
        self._ok()
        return result

    @property
    def available(self) -> bool:
        """Whether calls reach Redis now: False from a failure until a retry succeeds.

        Once the back-off has elapsed a down tier sends one PING to decide.
        """
        if self._closed:
            return False
        return not self._down or self.ping()

    def ping(self) -> bool:
        """PING Redis (unless in back-off); True if it answered."""
        try:
            return bool(self._call(lambda c: c.ping()))
        except RemoteUnavailable:
            return False

    # ---- writes -----------------------------------------------------------

    def put(self, key: ChunkKey, data: U8, meta: ChunkMeta) -> bool:
        """Store ``data`` under ``key`` (see :meth:`put_many`)."""
        return self.put_many([(key, data, meta)])[0]

    def put_many(self, items: Sequence[tuple[ChunkKey, U8, ChunkMeta]]) -> list[bool]:
        """Store chunks with pipelined SETs spread over ``parallelism`` connections.

        Args:
            items: (key, payload, meta); ``meta.checksum`` must be the payload's XXH3-128.

        Returns:
            Per item, True if stored. False (counted in ``rejected``) when the
            checksum does not match the payload, the value is larger than the
            budget, Redis refused it (OOM, read-only) or Redis is down.

        Raises:
            ChunkTooLarge: a payload exceeds ``max_chunk_bytes`` (nothing is sent).
            InvalidInput: a key is not 32 bytes or ``meta.nbytes`` is not the payload size.
        """
        jobs = [self._write_job(key, data, meta) for key, data, meta in items]
        done = [False] * len(jobs)
        try:
            client = self._client_now()
        except RemoteUnavailable:
            self._settle_writes(jobs, done, [])
            return done
        live: list[int] = []
        victims: list[tuple[ChunkKey, _Written]] = []
        for i, job in enumerate(jobs):
            evicted = self._reserve(job) if job is not None else None
            if evicted is not None:
                live.append(i)
                victims += evicted
        if victims and not self._unlink_quietly(client, [self._rkey(k) for k, _ in victims]):
            live = []  # Redis went down while evicting
        todo = [cast(_WriteJob, jobs[i]) for i in live]
        results = self._fan_out(client, todo, lambda j: j.rkey, lambda j: j.size,
                                lambda pool, group: self._write_group(client, pool, group))
        for i, ok in zip(live, results):
            done[i] = ok is True
        self._settle_writes(jobs, done, victims)
        return done

    def _write_job(self, key: ChunkKey, data: U8, meta: ChunkMeta) -> _WriteJob | None:
        payload = as_u8(data)
        if payload.size > self.config.max_chunk_bytes:
            with self._lock:
                self._stats.rejected += 1
            raise ChunkTooLarge(
                f"chunk of {payload.size} bytes exceeds max_chunk_bytes={self.config.max_chunk_bytes}"
                f" of tier {self.name!r}"
            )
        if len(key) != KEY_BYTES or meta.nbytes != payload.size:
            raise InvalidInput(f"need a {KEY_BYTES}-byte key and meta.nbytes == {payload.size}")
        if checksum(payload) != meta.checksum:
            log.warning("remote tier %r: chunk %s fails meta.checksum; refused", self.name, key.hex())
            return None
        header = RecordHeader(key, meta.namespace, payload.size, meta.checksum).pack()
        return _WriteJob(key, self._rkey(key), header, payload, meta)

    def _reserve(self, job: _WriteJob) -> list[tuple[ChunkKey, _Written]] | None:
        """Account for a write, evicting this tier's LRU writes to fit; None if it never fits."""
        now = time.monotonic()
        ttl = self.config.ttl_s
        with self._lock:
            self._purge_expired(now)
            self._forget(job.key)
            if job.size > self.capacity_bytes:
                return None
            victims = []
            while self._stats.used_bytes + job.size > self.capacity_bytes:
                key, old = self._written.popitem(last=False)
                self._stats.used_bytes -= old.size
                self._stats.evictions += 1
                victims.append((key, old))
            deadline = None if ttl is None else now + ttl
            self._written[job.key] = _Written(job.size, job.meta, deadline)
            if deadline is not None:
                self._deadlines.append((deadline, job.key))
            self._stats.used_bytes += job.size
            self._stats.entries = len(self._written)
            return victims

    def _write_group(self, client: Client, pool: ConnectionPool, jobs: list[_WriteJob]) -> list[bool]:
        pooled = pool.get_connection()
        conn = cast(_Conn, pooled)
        try:
            pieces = [p for job in jobs for p in _set_command(job, self.config.ttl_ms)]
            conn.send_packed_command(_coalesce(pieces))
            replies = [_set_reply(conn) for _ in jobs]
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(pooled)
        return [_set_quietly(client, j, self.config.ttl_ms) if r is _REDIRECT else r is True
                for j, r in zip(jobs, replies)]

    def _settle_writes(
        self, jobs: list[_WriteJob | None], done: list[bool], victims: list[tuple[ChunkKey, _Written]]
    ) -> None:
        with self._lock:
            for job, ok in zip(jobs, done):
                if ok and job is not None:
                    self._stats.puts += 1
                    self._stats.put_bytes += job.payload.size
                else:
                    self._stats.rejected += 1
                    if job is not None:
                        self._forget(job.key)
        for key, old in victims:
            self._notify_evicted(key, old.meta, None)

    # ---- reads ------------------------------------------------------------

    def get_into(self, key: ChunkKey, out: U8) -> int | None:
        """Copy the chunk into ``out[:n]``; see :meth:`get_many_into`."""
        return self.get_many_into([key], [out])[0]

    def get_many_into(self, keys: Sequence[ChunkKey], outs: Sequence[U8]) -> list[int | None]:
        """Fetch chunks into caller buffers: pipelined GETs over ``parallelism`` connections.

        Args:
            keys: chunk keys.
            outs: one writable uint8 buffer per key (numpy array or CPU tensor).

        Returns:
            Per key, the payload length n now in ``out[:n]``, or None on a
            counted miss (absent, evicted, expired, corrupt, too small, remote
            down). After a miss the buffer's contents are unspecified.

        Raises:
            InvalidInput: the lists differ in length or a buffer is not writable.
        """
        if len(keys) != len(outs):
            raise InvalidInput(f"{len(keys)} keys but {len(outs)} output buffers")
        views = [as_u8(out, writable=True) for out in outs]
        jobs = [_ReadJob(key, self._rkey(key), _fits(view)) for key, view in zip(keys, views)]
        got = self._read(jobs, [v.size for v in views])
        return [o.data.size if isinstance(o, _Got) else None for o in got]

    def read(self, key: ChunkKey) -> tuple[U8, ChunkMeta] | None:
        """A verified copy of the chunk and its meta, or None on a counted miss."""
        (got,) = self._read([_ReadJob(key, self._rkey(key), _fresh)], [0])
        if not isinstance(got, _Got):
            return None
        return got.data, ChunkMeta(got.header.namespace, got.data.size, got.header.checksum)

    def _read(self, jobs: list[_ReadJob], sizes: list[int]) -> list[Outcome]:
        try:
            client = self._client_now()
        except RemoteUnavailable:
            return self._settle_reads(None, jobs, [None] * len(jobs))
        sized = dict(zip(map(id, jobs), sizes))
        results = self._fan_out(client, jobs, lambda j: j.rkey, lambda j: sized[id(j)],
                                lambda pool, group: self._read_group(client, pool, group))
        return self._settle_reads(client, jobs, results)

    def _read_group(self, client: Client, pool: ConnectionPool, jobs: list[_ReadJob]) -> list[Outcome]:
        pooled = pool.get_connection()
        conn = cast(_Conn, pooled)
        try:
            conn.send_packed_command(conn.pack_commands([("GET", job.rkey) for job in jobs]))
            replies = _Replies(_socket_of(conn))
            raw = [_recv_record(replies, job) for job in jobs]
        except TimeoutError as exc:  # socket.timeout from recv_into
            conn.disconnect()
            raise rex.TimeoutError(f"GET timed out: {exc}") from exc
        except OSError as exc:
            conn.disconnect()
            raise rex.ConnectionError(f"GET failed: {exc}") from exc
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(pooled)
        return [_parse_value(_get_quietly(client, j.rkey), j) if o is _REDIRECT else cast(Outcome, o)
                for j, o in zip(jobs, raw)]

    def _settle_reads(
        self, client: Client | None, jobs: list[_ReadJob], results: list[Outcome | None]
    ) -> list[Outcome]:
        now = time.monotonic()
        out: list[Outcome] = []
        corrupt: list[_ReadJob] = []
        with self._lock:
            for job, res in zip(jobs, results):
                if isinstance(res, _Got):
                    self._stats.hits += 1
                    self._stats.hit_bytes += res.data.size
                    if job.key in self._written:
                        self._written.move_to_end(job.key)
                    out.append(res)
                    continue
                reason = MissReason.REMOTE_DOWN if res is None else res
                if reason is MissReason.ABSENT:
                    reason = self._vanished(job.key, now)
                elif reason is MissReason.CORRUPT:
                    corrupt.append(job)
                    self._forget(job.key)
                self._stats.miss(reason)
                out.append(reason)
        for job in corrupt:
            log.warning("remote tier %r: chunk %s is corrupt; deleted", self.name, job.key.hex())
        if corrupt and client is not None:
            self._unlink_quietly(client, [job.rkey for job in corrupt])
        return out

    def meta(self, key: ChunkKey) -> ChunkMeta | None:
        """The chunk's meta from its header (GETRANGE + STRLEN), or None if absent, corrupt or down."""
        rkey = self._rkey(key)

        def fetch(c: Client) -> list[object]:
            pipe = c.pipeline(transaction=False)
            pipe.getrange(rkey, 0, HEADER_BYTES - 1)
            pipe.strlen(rkey)
            return cast(list[object], pipe.execute(raise_on_error=False))

        try:
            raw, length = self._call(fetch)
        except RemoteUnavailable:
            self._count_miss(MissReason.REMOTE_DOWN)
            return None
        if raw == b"" or length == 0:
            return None
        try:
            header = RecordHeader.unpack(cast(bytes, raw), key)
            if not isinstance(raw, bytes) or header.payload_len != cast(int, length) - HEADER_BYTES:
                raise ChunkCorrupt("length mismatch")
        except (ChunkCorrupt, TypeError) as exc:
            log.warning("remote tier %r: chunk %s is corrupt (%s); deleted", self.name, key.hex(), exc)
            self.delete(key)
            self._count_miss(MissReason.CORRUPT)
            return None
        return ChunkMeta(header.namespace, header.payload_len, header.checksum)

    def contains(self, key: ChunkKey) -> bool:
        """EXISTS; False (and a REMOTE_DOWN miss) when Redis is down."""
        return self.count_leading([key]) == 1

    def count_leading(self, keys: list[ChunkKey]) -> int:
        """How many of ``keys``, from the first, exist: one pipelined EXISTS round trip
        (per node in Cluster mode). 0 and a counted REMOTE_DOWN miss when Redis is down."""
        if not keys:
            return 0
        rkeys = [self._rkey(k) for k in keys]

        def exists(c: Client) -> list[object]:
            pipe = c.pipeline(transaction=False)
            for rkey in rkeys:
                pipe.exists(rkey)
            return cast(list[object], pipe.execute())

        try:
            found = self._call(exists)
        except RemoteUnavailable:
            self._count_miss(MissReason.REMOTE_DOWN)
            return 0
        return next((i for i, hit in enumerate(found) if not hit), len(found))

    # ---- deletion and listing ---------------------------------------------

    def delete(self, key: ChunkKey) -> bool:
        """UNLINK the chunk; True if it was there, False if absent or Redis is down."""
        try:
            n = self._call(lambda c: c.unlink(self._rkey(key)))
        except RemoteUnavailable:
            return False
        with self._lock:
            self._forget(key)
        return bool(n)

    def keys(self, namespace: NamespaceId | None = None) -> Iterator[ChunkKey]:
        """A snapshot of the chunk keys under the prefix (of one namespace: read from headers).

        Raises:
            RemoteUnavailable: Redis is down (admin calls do not pretend it is empty).
        """
        return iter(self._call(lambda c: self._scan(c, namespace)))

    def clear(self, namespace: NamespaceId | None = None) -> int:
        """Delete every chunk under the prefix (of one namespace); returns how many.

        Raises:
            RemoteUnavailable: Redis is down.
        """
        keys = list(self.keys(namespace))
        n = self._call(lambda c: _unlink(c, [self._rkey(k) for k in keys]))
        with self._lock:
            for key in keys:
                self._forget(key)
        return n

    def _scan(self, client: Client, namespace: NamespaceId | None) -> list[ChunkKey]:
        found = [(rk, k) for rk in client.scan_iter(match=self._pattern, count=_SCAN_COUNT)
                 if (k := self._chunk_key(cast(bytes, rk))) is not None]
        if namespace is None:
            return [k for _, k in found]
        keys: list[ChunkKey] = []
        for start in range(0, len(found), _SCAN_COUNT):
            batch = found[start : start + _SCAN_COUNT]
            pipe = client.pipeline(transaction=False)
            for rk, _ in batch:
                pipe.getrange(rk, 0, HEADER_BYTES - 1)
            for (_, key), raw in zip(batch, pipe.execute(raise_on_error=False)):
                if isinstance(raw, bytes) and _namespace_of(raw, key) == namespace:
                    keys.append(key)
        return keys

    # ---- the rest of the Tier interface ------------------------------------

    def pin(self, key: ChunkKey) -> bool:
        """Redis values cannot be pinned: returns :meth:`contains`; leases protect local tiers only."""
        return self.contains(key)

    def unpin(self, key: ChunkKey) -> None:
        """No-op (see :meth:`pin`)."""

    def stats(self) -> TierStats:
        with self._lock:
            self._purge_expired(time.monotonic())
            return self._stats.snapshot()

    def close(self) -> None:
        """Stop the worker threads and close every connection; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            client, self._client = self._client, None
        self._workers.shutdown(wait=True)
        _close_client(client)

    # ---- helpers -------------------------------------------------------------

    def _rkey(self, key: ChunkKey) -> bytes:
        return self._prefix + key.hex().encode()

    def _chunk_key(self, rkey: bytes) -> ChunkKey | None:
        tail = rkey[len(self._prefix) :]
        if not rkey.startswith(self._prefix) or len(tail) != 2 * KEY_BYTES:
            return None
        try:
            return ChunkKey(bytes.fromhex(tail.decode("ascii")))
        except ValueError:
            return None

    def _count_miss(self, reason: MissReason) -> None:
        with self._lock:
            self._stats.miss(reason)

    def _forget(self, key: ChunkKey) -> _Written | None:
        """Drop a key from the budget accounting (lock held)."""
        old = self._written.pop(key, None)
        if old is not None:
            self._stats.used_bytes -= old.size
            self._stats.entries = len(self._written)
        return old

    def _vanished(self, key: ChunkKey, now: float) -> MissReason:
        """Why a key is gone from Redis, as far as this tier knows (lock held)."""
        old = self._forget(key)
        if old is None:
            return MissReason.ABSENT
        return MissReason.EXPIRED if old.deadline is not None and now >= old.deadline else MissReason.EVICTED

    def _purge_expired(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, key = self._deadlines.popleft()
            old = self._written.get(key)
            if old is not None and old.deadline == deadline:
                self._forget(key)

    def _unlink_quietly(self, client: Client, rkeys: list[bytes]) -> bool:
        if self._down:  # ``client`` was closed by _failed
            return False
        try:
            _unlink(client, rkeys)
        except _DOWN as exc:
            self._failed(exc)
            return False
        return True

    def _fan_out(
        self,
        client: Client,
        jobs: list[J],
        rkey: Callable[[J], bytes],
        size: Callable[[J], int],
        run: Callable[[ConnectionPool, list[J]], list[R]],
    ) -> list[R | None]:
        """Run ``run`` over groups of jobs (one node, <= _BATCH_BYTES each), ``parallelism`` at once.

        Jobs of a group whose connection failed come back None, and the tier is marked down.
        """
        results: list[R | None] = [None] * len(jobs)
        try:
            groups = _groups(client, [rkey(j) for j in jobs], [size(j) for j in jobs])
        except _DOWN as exc:
            self._failed(exc)
            return results
        failure: BaseException | None = None
        if len(groups) == 1 or self.config.parallelism == 1:
            for pool, idx in groups:
                try:
                    for i, r in zip(idx, run(pool, [jobs[i] for i in idx])):
                        results[i] = r
                except _DOWN as exc:
                    failure = exc
                    break
        else:
            futures: list[tuple[list[int], Future[list[R]]]] = [
                (idx, self._workers.submit(run, pool, [jobs[i] for i in idx])) for pool, idx in groups
            ]
            for idx, fut in futures:
                try:
                    for i, r in zip(idx, fut.result()):
                        results[i] = r
                except _DOWN as exc:
                    failure = failure or exc
        if failure is not None:
            self._failed(failure)
        else:
            self._ok()
        return results


def _groups(client: Client, rkeys: list[bytes], sizes: list[int]) -> list[tuple[ConnectionPool, list[int]]]:
    """Job indices by node, cut into round trips of at most _BATCH_BYTES (one job at least)."""
    by_node: dict[int, tuple[ConnectionPool, list[int]]] = {}
    for i, rkey in enumerate(rkeys):
        pool = _pool_for(client, rkey)
        by_node.setdefault(id(pool), (pool, []))[1].append(i)
    groups: list[tuple[ConnectionPool, list[int]]] = []
    for pool, idx in by_node.values():
        run: list[int] = []
        nbytes = 0
        for i in idx:
            if run and nbytes + sizes[i] > _BATCH_BYTES:
                groups.append((pool, run))
                run, nbytes = [], 0
            run.append(i)
            nbytes += sizes[i]
        groups.append((pool, run))
    return groups


def _pool_for(client: Client, rkey: bytes) -> ConnectionPool:
    if isinstance(client, RedisCluster):
        node = cast(Any, client).get_node_from_key(rkey)
        return client.get_redis_connection(node).connection_pool
    return client.connection_pool


def _set_reply(conn: _Conn) -> bool | _Redirect:
    try:
        conn.read_response()
    except _DOWN:
        raise
    except rex.AskError:  # MOVED too
        return _REDIRECT
    except rex.ResponseError as exc:  # OOM, READONLY...: this value is refused, the link is fine
        log.warning("redis refused a SET: %s", exc)
        return False
    return True


def _set_quietly(client: Client, job: _WriteJob, ttl_ms: int | None) -> bool:
    """SET through redis-py (which follows MOVED/ASK), at the price of one copy of the value."""
    try:
        client.set(job.rkey, job.header + job.payload.tobytes(), px=ttl_ms)
    except _DOWN:
        raise
    except rex.ResponseError as exc:
        log.warning("redis refused a SET: %s", exc)
        return False
    return True


def _get_quietly(client: Client, rkey: bytes) -> object:
    try:
        return client.get(rkey)
    except _DOWN:
        raise
    except rex.ResponseError:  # WRONGTYPE: not one of ours
        return b""


def _unlink(client: Client, rkeys: list[bytes]) -> int:
    n = 0
    for start in range(0, len(rkeys), _SCAN_COUNT):
        pipe = client.pipeline(transaction=False)
        for rkey in rkeys[start : start + _SCAN_COUNT]:
            pipe.unlink(rkey)
        n += sum(int(cast(int, r)) for r in pipe.execute())
    return n


def _namespace_of(raw: bytes, key: ChunkKey) -> NamespaceId | None:
    try:
        return RecordHeader.unpack(raw, key).namespace
    except ChunkCorrupt:
        return None


def _close_client(client: Client | None) -> None:
    if client is None:
        return
    try:
        if isinstance(client, RedisCluster):
            client.close()
        else:
            client.connection_pool.disconnect()
            client.close()
    except (rex.RedisError, rex.RedisClusterException, OSError) as exc:  # closing must not fail the caller
        log.debug("closing redis client: %s", exc)


register_tier("redis", RemoteTier)
