"""Shared pytest fixtures.

Redis: real ``redis-server`` processes from tests/redis_servers.py. A test is
skipped (with the reason) only when redis-server / redis-cli are not on PATH;
CI installs them with apt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.redis_servers import REDIS_CLI, REDIS_SERVER, RedisClusterNodes, RedisServer


def _require_redis(cluster: bool = False) -> None:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server)")
    if cluster and REDIS_CLI is None:
        pytest.skip("redis-cli is not on PATH (apt-get install redis-tools)")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh, empty redis-server for this test only; killed (and its dir removed) afterwards.

    Tests may kill, pause and restart it (same port) freely.
    """
    _require_redis()
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[..., RedisServer]]:
    """Makes unstarted RedisServer objects (e.g. on a chosen port); all are closed afterwards."""
    _require_redis()
    made: list[RedisServer] = []

    def make(port: int | None = None, **kwargs: object) -> RedisServer:
        server = RedisServer(port, **kwargs)  # type: ignore[arg-type]
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    """A 3-primary Redis Cluster shared by the whole session (about 2 s to form).

    Tests share it: use a unique ``key_prefix`` per test, or call ``flushall()``.
    """
    _require_redis(cluster=True)
    cluster = RedisClusterNodes(3).start()
    try:
        yield cluster
    finally:
        cluster.close()
