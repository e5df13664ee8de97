"""The remote tier's link to Redis/Valkey: client, pools, worker threads and the down/back-off state.

Small commands, pools, AUTH/SELECT and Cluster topology are plain redis-py;
the link decides when Redis counts as down and spreads the round trips of a
batch over nodes and worker threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar, cast

import redis
from redis import exceptions as rex
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.connection import BlockingConnectionPool, ConnectionPool
from redis.retry import Retry

from kvstore.errors import RemoteUnavailable
from kvstore.tiers.remote_config import RemoteTierConfig

log = logging.getLogger("kvstore.tiers.remote")  # the tier's logger: one name for all of its messages

BATCH_BYTES = 8 << 20  # value bytes per pipelined round trip (at least one value)
SCAN_COUNT = 512
#: redis-py errors that mean the server cannot be reached (as opposed to a refused command)
DOWN = (rex.ConnectionError, rex.TimeoutError, rex.ClusterError, rex.RedisClusterException)

Client = redis.Redis | RedisCluster
R = TypeVar("R")
J = TypeVar("J")


class RedisLink:
    """The one redis-py client of a remote tier, with its pools and worker threads.

    Invariants:
      * ``client`` is created lazily and dropped (closed) at the first
        connection error or timeout; the link is then down until
        ``_retry_at`` and :meth:`client_now` raises RemoteUnavailable at once;
        the first call after the back-off connects again;
      * after :meth:`close` no client is created again and the workers are stopped.
    """

    def __init__(self, config: RemoteTierConfig, name: str) -> None:
        self.config = config
        self.name = name
        self._lock = threading.RLock()
        self._client: Client | None = None
        self._down = False
        self._retry_at = 0.0
        self._closed = False
        self._workers = ThreadPoolExecutor(config.parallelism, thread_name_prefix=f"kvs-{name}")

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

    def client_now(self) -> Client:
        """The client, connecting if needed.

        Raises:
            RemoteUnavailable: closed, in back-off, or the connection failed (then marked down).
        """
        with self._lock:
            if self._closed:
                raise RemoteUnavailable(f"tier {self.name!r} is closed")
            if time.monotonic() < self._retry_at:
                raise RemoteUnavailable(f"tier {self.name!r} is down; retrying after the back-off")
            if self._client is None:
                try:
                    self._client = self._connect()
                except DOWN as exc:
                    self.failed(exc)
                    raise RemoteUnavailable(f"tier {self.name!r}: {exc}") from exc
            return self._client

    def failed(self, exc: BaseException) -> None:
        """Mark the link down for ``retry_interval_s`` and close the client."""
        c = self.config
        with self._lock:
            client, self._client = self._client, None
            first = not self._down
            self._down = True
            self._retry_at = time.monotonic() + c.retry_interval_s
        if first:
            log.warning("remote tier %r is down (%s); retry in %.1f s", self.name, exc, c.retry_interval_s)
        close_client(client)

    def ok(self) -> None:
        """Record a call that reached Redis."""
        if self._down:
            with self._lock:
                self._down = False
            log.info("remote tier %r is reachable again", self.name)

    def call(self, fn: Callable[[Client], R]) -> R:
        """Run ``fn``; a connection problem marks the link down and raises RemoteUnavailable."""
        client = self.client_now()
        try:
            result = fn(client)
        except DOWN as exc:
            self.failed(exc)
            raise RemoteUnavailable(f"tier {self.name!r}: {exc}") from exc
        self.ok()
        return result

    @property
    def available(self) -> bool:
        """False from a failure until a retry succeeds; once the back-off is over, one PING decides."""
        if self._closed:
            return False
        return not self._down or self.ping()

    def ping(self) -> bool:
        """PING Redis (unless in back-off); True if it answered."""
        try:
            return bool(self.call(lambda c: c.ping()))
        except RemoteUnavailable:
            return False

    def unlink_quietly(self, client: Client, rkeys: list[bytes]) -> bool:
        """UNLINK ``rkeys``; False (the link marked down) instead of raising."""
        if self._down:  # ``client`` was closed by failed()
            return False
        try:
            unlink(client, rkeys)
        except DOWN as exc:
            self.failed(exc)
            return False
        return True

    def fan_out(
        self,
        jobs: list[J],
        pool_of: Callable[[J], ConnectionPool],
        size: Callable[[J], int],
        run: Callable[[ConnectionPool, list[J]], list[R]],
    ) -> list[R | None]:
        """Run ``run`` over groups of jobs (one node, <= BATCH_BYTES each), ``parallelism`` at once.

        Jobs of a group whose connection failed come back None, and the link is marked down.
        """
        results: list[R | None] = [None] * len(jobs)
        try:
            groups = group_by_node([pool_of(j) for j in jobs], [size(j) for j in jobs])
        except DOWN as exc:
            self.failed(exc)
            return results
        if len(groups) == 1 or self.config.parallelism == 1:
            failure = self._run_inline(jobs, groups, run, results)
        else:
            failure = self._run_parallel(jobs, groups, run, results)
        if failure is not None:
            self.failed(failure)
        else:
            self.ok()
        return results

    def _run_inline(
        self,
        jobs: list[J],
        groups: list[tuple[ConnectionPool, list[int]]],
        run: Callable[[ConnectionPool, list[J]], list[R]],
        results: list[R | None],
    ) -> BaseException | None:
        for pool, idx in groups:
            try:
                for i, r in zip(idx, run(pool, [jobs[i] for i in idx])):
                    results[i] = r
            except DOWN as exc:
                return exc
        return None

    def _run_parallel(
        self,
        jobs: list[J],
        groups: list[tuple[ConnectionPool, list[int]]],
        run: Callable[[ConnectionPool, list[J]], list[R]],
        results: list[R | None],
    ) -> BaseException | None:
        failure: BaseException | None = None
        futures: list[tuple[list[int], Future[list[R]]]] = [
            (idx, self._workers.submit(run, pool, [jobs[i] for i in idx])) for pool, idx in groups
        ]
        for idx, fut in futures:
            try:
                for i, r in zip(idx, fut.result()):
                    results[i] = r
            except DOWN as exc:
                failure = failure or exc
        return failure

    def close(self) -> None:
        """Stop the worker threads and close every connection; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            client, self._client = self._client, None
        self._workers.shutdown(wait=True)
        close_client(client)


def group_by_node(pools: list[ConnectionPool], sizes: list[int]) -> list[tuple[ConnectionPool, list[int]]]:
    """Job indices by node (``pools[i]`` serves job i), cut into round trips of at most BATCH_BYTES."""
    by_node: dict[int, tuple[ConnectionPool, list[int]]] = {}
    for i, pool in enumerate(pools):
        by_node.setdefault(id(pool), (pool, []))[1].append(i)
    groups: list[tuple[ConnectionPool, list[int]]] = []
    for pool, idx in by_node.values():
        run: list[int] = []
        nbytes = 0
        for i in idx:
            if run and nbytes + sizes[i] > BATCH_BYTES:
                groups.append((pool, run))
                run, nbytes = [], 0
            run.append(i)
            nbytes += sizes[i]
        groups.append((pool, run))
    return groups


def unlink(client: Client, rkeys: list[bytes]) -> int:
    """UNLINK ``rkeys`` in pipelines of SCAN_COUNT; returns how many existed."""
    n = 0
    for start in range(0, len(rkeys), SCAN_COUNT):
        pipe = client.pipeline(transaction=False)
        for rkey in rkeys[start : start + SCAN_COUNT]:
            pipe.unlink(rkey)
        n += sum(int(cast(int, r)) for r in pipe.execute())
    return n


def close_client(client: Client | None) -> None:
    """Disconnect every pool of ``client``; never raises."""
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
