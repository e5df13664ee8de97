"""The remote tier: chunks in Redis or Valkey, standalone or Cluster.

Layout: each chunk is one Redis string under ``key_prefix + key.hex()``,
holding the 104-byte record header (kvstore.tiers.record) then the payload;
how keys are named and listed is kvstore.tiers.remote_keys.

Data path: values travel on redis-py's pooled connections, framed in
kvstore.tiers.resp (payloads sent from and received into caller memory, then
checked against their XXH3-128); a Cluster redirect, or a connection with no
socket to read replies from, goes through redis-py's own SET/GET instead
(``_set_quietly``, ``_get_quietly``). Small commands, pools, AUTH/SELECT and
Cluster topology are plain redis-py (kvstore.tiers.remote_link). The tier's
own byte budget is kvstore.tiers.remote_ledger, its config
kvstore.tiers.remote_config.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

from redis import exceptions as rex
from redis.cluster import RedisCluster
from redis.connection import ConnectionPool

from kvstore.buffers import U8, as_u8
from kvstore.checksum import checksum
from kvstore.errors import ChunkCorrupt, ChunkTooLarge, InvalidInput, RemoteUnavailable
from kvstore.keys import KEY_BYTES, ChunkKey, NamespaceId
from kvstore.tiers.base import ChunkMeta, MissReason, Tier, TierStats, register_tier
from kvstore.tiers.record import HEADER_BYTES, RecordHeader
from kvstore.tiers.remote_config import MAX_VALUE_BYTES, RemoteTierConfig
from kvstore.tiers.remote_keys import KeySpace
from kvstore.tiers.remote_ledger import Victims, WriteLedger
from kvstore.tiers.remote_link import DOWN, Client, RedisLink, unlink
from kvstore.tiers.resp import (
    Dest,
    Got,
    Outcome,
    ReadJob,
    WriteJob,
    fits,
    fresh,
    parse_value,
    read_group,
    write_group,
)

__all__ = ["MAX_VALUE_BYTES", "Client", "Dest", "Outcome", "RemoteTier", "RemoteTierConfig"]

log = logging.getLogger(__name__)

R = TypeVar("R")


class RemoteTier(Tier):
    """Chunks in Redis/Valkey, shared by every process that uses the same prefix.

    Invariants:
      * every value this tier writes is ``RecordHeader + payload`` whose
        checksum was verified against ``meta.checksum`` before sending;
      * a read hands out bytes only after the header (its key, its length)
        and the payload's XXH3-128 match; otherwise it counts a CORRUPT miss
        and deletes the value;
      * ``used_bytes`` is the sum of what ``_ledger`` holds (values this
        instance wrote, least recently used first) and never exceeds
        ``capacity_bytes``;
      * after a connection error or timeout the tier is down until the
        back-off of ``_link`` ends: data-path calls (get, contains, count_leading, put)
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
        self._space = KeySpace(config.key_prefix)
        self._link = RedisLink(config, name)
        self._ledger = WriteLedger(self._stats, config.ttl_s)
        self.ping()

    # ---- connection state (see RedisLink) -------------------------------

    def _client_now(self) -> Client:
        return self._link.client_now()

    def _call(self, fn: Callable[[Client], R]) -> R:
        """Run ``fn``; a connection problem marks the tier down and raises RemoteUnavailable."""
        return self._link.call(fn)

    @property
    def available(self) -> bool:
        """Whether calls reach Redis now: False from a failure until a retry succeeds.

        Once the back-off has elapsed a down tier sends one PING to decide.
        """
        return self._link.available

    def ping(self) -> bool:
        """PING Redis (unless in back-off); True if it answered."""
        return self._link.ping()

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
        victims: Victims = []
        for i, job in enumerate(jobs):
            evicted = self._reserve(job) if job is not None else None
            if evicted is not None:
                live.append(i)
                victims += evicted
        if victims and not self._link.unlink_quietly(client, [self._rkey(k) for k, _ in victims]):
            live = []  # Redis went down while evicting
        todo = [cast(WriteJob, jobs[i]) for i in live]
        results = self._link.fan_out(todo, lambda j: _pool_for(client, j.rkey), lambda j: j.size,
                                     lambda pool, group: self._write_group(client, pool, group))
        for i, ok in zip(live, results):
            done[i] = ok is True
        self._settle_writes(jobs, done, victims)
        return done

    def _write_job(self, key: ChunkKey, data: U8, meta: ChunkMeta) -> WriteJob | None:
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
        digest = checksum(payload)  # an empty meta.checksum means "not computed yet"
        if meta.checksum and digest != meta.checksum:
            log.warning("remote tier %r: chunk %s fails meta.checksum; refused", self.name, key.hex())
            return None
        header = RecordHeader(key, meta.namespace, payload.size, digest).pack()
        return WriteJob(key, self._rkey(key), header, payload, meta)

    def _reserve(self, job: WriteJob) -> Victims | None:
        """Account for a write, evicting this tier's LRU writes to fit; None if it never fits."""
        now = time.monotonic()
        with self._lock:
            return self._ledger.reserve(job.key, job.size, job.meta, now)

    def _write_group(self, client: Client, pool: ConnectionPool, jobs: list[WriteJob]) -> list[bool]:
        ttl_ms = self.config.ttl_ms
        return write_group(pool, jobs, ttl_ms, lambda j: _set_quietly(client, j, ttl_ms))

    def _settle_writes(self, jobs: list[WriteJob | None], done: list[bool], victims: Victims) -> None:
        with self._lock:
            for job, ok in zip(jobs, done):
                if ok and job is not None:
                    self._stats.puts += 1
                    self._stats.put_bytes += job.payload.size
                else:
                    self._stats.rejected += 1
                    if job is not None:
                        self._ledger.forget(job.key)
        for key, old in victims:
            self._notify_evicted(key, old.meta, None)

    # ---- reads ------------------------------------------------------------

    def get_into(self, key: ChunkKey, out: U8, namespace: NamespaceId | None = None) -> int | None:
        """Copy the chunk into ``out[:n]``; see :meth:`get_many_into`."""
        return self.get_many_into([key], [out], namespace)[0]

    def get_many_into(
        self, keys: Sequence[ChunkKey], outs: Sequence[U8], namespace: NamespaceId | None = None
    ) -> list[int | None]:
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

        With ``namespace``, a record of another namespace is an ``absent`` miss
        and its bytes are wiped from the buffer: one tenant never reads another's KV.
        """
        if len(keys) != len(outs):
            raise InvalidInput(f"{len(keys)} keys but {len(outs)} output buffers")
        views = [as_u8(out, writable=True) for out in outs]
        jobs = [ReadJob(key, self._rkey(key), fits(view)) for key, view in zip(keys, views)]
        got = self._read(jobs, [v.size for v in views])
        return [self._own(o, namespace) for o in got]

    def _own(self, outcome: Outcome, namespace: NamespaceId | None) -> int | None:
        if not isinstance(outcome, Got):
            return None
        if namespace is not None and outcome.header.namespace != namespace:
            outcome.data[:] = 0
            self._count_miss(MissReason.ABSENT)
            return None
        return int(outcome.data.size)

    def read(self, key: ChunkKey) -> tuple[U8, ChunkMeta] | None:
        """A verified copy of the chunk and its meta, or None on a counted miss."""
        (got,) = self._read([ReadJob(key, self._rkey(key), fresh)], [0])
        if not isinstance(got, Got):
            return None
        return got.data, ChunkMeta(got.header.namespace, got.data.size, got.header.checksum)

    def _read(self, jobs: list[ReadJob], sizes: list[int]) -> list[Outcome]:
        try:
            client = self._client_now()
        except RemoteUnavailable:
            return self._settle_reads(None, jobs, [None] * len(jobs))
        sized = dict(zip(map(id, jobs), sizes))
        results = self._link.fan_out(jobs, lambda j: _pool_for(client, j.rkey), lambda j: sized[id(j)],
                                     lambda pool, group: self._read_group(client, pool, group))
        return self._settle_reads(client, jobs, results)

    def _read_group(self, client: Client, pool: ConnectionPool, jobs: list[ReadJob]) -> list[Outcome]:
        return read_group(pool, jobs, lambda j: parse_value(_get_quietly(client, j.rkey), j))

    def _settle_reads(
        self, client: Client | None, jobs: list[ReadJob], results: list[Outcome | None]
    ) -> list[Outcome]:
        now = time.monotonic()
        out: list[Outcome] = []
        corrupt: list[ReadJob] = []
        with self._lock:
            for job, res in zip(jobs, results):
                if isinstance(res, Got):
                    self._stats.hits += 1
                    self._stats.hit_bytes += res.data.size
                    self._ledger.touch(job.key)
                    out.append(res)
                    continue
                reason = MissReason.REMOTE_DOWN if res is None else res
                if reason is MissReason.ABSENT:
                    reason = self._ledger.vanished(job.key, now)
                elif reason is MissReason.CORRUPT:
                    corrupt.append(job)
                    self._ledger.forget(job.key)
                self._stats.miss(reason)
                out.append(reason)
        for job in corrupt:
            log.warning("remote tier %r: chunk %s is corrupt; deleted", self.name, job.key.hex())
        if corrupt and client is not None:
            self._link.unlink_quietly(client, [job.rkey for job in corrupt])
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
            self._ledger.forget(key)
        return bool(n)

    def keys(self, namespace: NamespaceId | None = None) -> Iterator[ChunkKey]:
        """A snapshot of the chunk keys under the prefix (of one namespace: read from headers).

        Raises:
            RemoteUnavailable: Redis is down (admin calls do not pretend it is empty).
        """
        return iter(self._call(lambda c: self._space.scan(c, namespace)))

    def clear(self, namespace: NamespaceId | None = None) -> int:
        """Delete every chunk under the prefix (of one namespace); returns how many.

        Raises:
            RemoteUnavailable: Redis is down.
        """
        keys = list(self.keys(namespace))
        n = self._call(lambda c: unlink(c, [self._rkey(k) for k in keys]))
        with self._lock:
            for key in keys:
                self._ledger.forget(key)
        return n

    # ---- the rest of the Tier interface ------------------------------------

    def pin(self, key: ChunkKey) -> bool:
        """Redis values cannot be pinned: returns :meth:`contains`; leases protect local tiers only."""
        return self.contains(key)

    def unpin(self, key: ChunkKey) -> None:
        """No-op (see :meth:`pin`)."""

    def stats(self) -> TierStats:
        with self._lock:
            self._ledger.purge_expired(time.monotonic())
            return self._stats.snapshot()

    def close(self) -> None:
        """Stop the worker threads and close every connection; idempotent."""
        self._link.close()

    # ---- helpers -------------------------------------------------------------

    def _rkey(self, key: ChunkKey) -> bytes:
        return self._space.rkey(key)

    def _count_miss(self, reason: MissReason) -> None:
        with self._lock:
            self._stats.miss(reason)


def _pool_for(client: Client, rkey: bytes) -> ConnectionPool:
    """The connection pool of the node that serves ``rkey``."""
    if isinstance(client, RedisCluster):
        node = cast(Any, client).get_node_from_key(rkey)
        return client.get_redis_connection(node).connection_pool
    return client.connection_pool


def _set_quietly(client: Client, job: WriteJob, ttl_ms: int | None) -> bool:
    """SET through redis-py (which follows MOVED/ASK), at the price of one copy of the value."""
    try:
        client.set(job.rkey, job.header + job.payload.tobytes(), px=ttl_ms)
    except DOWN:
        raise
    except rex.ResponseError as exc:
        log.warning("redis refused a SET: %s", exc)
        return False
    return True


def _get_quietly(client: Client, rkey: bytes) -> object:
    """GET through redis-py (which follows MOVED/ASK); a WRONGTYPE value reads as corrupt."""
    try:
        return client.get(rkey)
    except DOWN:
        raise
    except rex.ResponseError:  # WRONGTYPE: not one of ours
        return b""


register_tier("redis", RemoteTier)
