"""Peer sharing between two real daemons on loopback, through a real Redis (and Redis Cluster) index.

Daemon A holds a prefix; daemon B misses locally, finds A in the index, pulls
the chunks (checksummed), stores them and answers the lookup with the hit.
Stale entries (A dead, A no longer holding a chunk, a wrong size) cost a miss
counted by reason on B's /metrics, never an error to the client.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from kvstore.client.sync import Client
from kvstore.keys import Namespace, prefix_keys
from kvstore.service.config_load import load_config
from tests.redis_servers import RedisClusterNodes, RedisServer
from tests.service.daemon_fixtures import (
    ADMIN_TOKEN,
    TOKEN_A,
    TOKEN_B,
    TOKENS,
    DaemonProc,
    chunk_bytes,
    metric_value,
    namespace,
)

CHUNK = 16  # tokens per chunk in daemon_fixtures.SPEC
TTL_S = 1.5


def _daemon(tmp: Path, name: str, index_url: str, prefix: str, *extra: str, tokens: bool = False) -> DaemonProc:
    args = ["--peer-index-url", index_url, "--peer-index-prefix", prefix, "--peer-ttl-s", str(TTL_S),
            "--peer-timeout-s", "3", "--peer-id", name, *extra]  # fmt: skip
    return DaemonProc(tmp / name, args=args, tokens=TOKENS if tokens else None, name=name)


@pytest.fixture
def pair(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[DaemonProc, DaemonProc, RedisServer, str]]:
    prefix = f"kvt-{uuid.uuid4().hex[:8]}"
    a = _daemon(tmp_path, "a", redis_server.url, prefix)
    b = _daemon(tmp_path, "b", redis_server.url, prefix)
    try:
        a.start()
        b.start()
        yield a, b, redis_server, prefix
    finally:
        for d in (a, b):
            d.kill()


def _tokens(n_chunks: int, seed: int) -> list[int]:
    return [(seed * 1000 + i) % 50000 for i in range(n_chunks * CHUNK)]


def _wait_published(client: redis.Redis | redis.RedisCluster, prefix: str, ns: Namespace, peer: str,
                    n: int, timeout: float = 10.0) -> None:
    key = f"{prefix}:{{{ns.id.hex()}}}:chunks:{peer}"
    deadline = time.monotonic() + timeout
    while client.hlen(key) != n:
        assert time.monotonic() < deadline, f"{peer} published {client.hlen(key)} entries, expected {n}"
        time.sleep(0.05)


def _misses(d: DaemonProc, reason: str, token: str | None = None) -> float:
    text = d.call("GET", "/metrics", token=token).body.decode()
    return metric_value(text, "kvstore_peer_misses_total", reason=reason) or 0.0


def test_lookup_miss_pulls_the_prefix_from_the_peer_that_holds_it(pair) -> None:
    a, b, server, prefix = pair
    ns = a.register("tenant-a")
    tokens = _tokens(4, seed=1)
    a.put_chunks(ns, tokens, seed=10)
    with server.client() as r:
        _wait_published(r, prefix, ns, "a", 4)
    with Client.connect(f"kvstore://127.0.0.1:{b.port}", use_shm=False) as kv:
        kv.register(ns)
        hit = kv.lookup(ns, tokens + [1, 2, 3])
        assert hit.hit_tokens == 4 * CHUNK
        assert hit.tiers and all(t == "cpu" for t in hit.tiers)  # stored locally on B now
        keys = prefix_keys(ns, tokens)
        for i, key in enumerate(keys):
            out = np.empty(2048, dtype=np.uint8)
            assert kv.get(ns, key, out, lease=hit.lease) == 2048
            assert out.tobytes() == chunk_bytes(10 + i)
        kv.release(hit)
    text = b.call("GET", "/metrics").body.decode()
    assert metric_value(text, "kvstore_peer_pulled_chunks_total") == 4
    assert metric_value(text, "kvstore_peer_pulled_bytes_total") == 4 * 2048
    # B now publishes what it pulled; A's second half is found by B, a third daemon would find both
    with server.client() as r:
        _wait_published(r, prefix, ns, "b", 4)


def test_partial_local_hit_is_extended_by_the_peer(pair) -> None:
    a, b, server, prefix = pair
    ns = a.register("tenant-a")
    tokens = _tokens(6, seed=2)
    a.put_chunks(ns, tokens, seed=20)
    b.register("tenant-a")
    b.put_chunks(ns, tokens[: 2 * CHUNK], seed=20)
    with server.client() as r:
        _wait_published(r, prefix, ns, "a", 6)
    with Client.connect(f"kvstore://127.0.0.1:{b.port}", use_shm=False) as kv:
        hit = kv.lookup(ns, tokens, lease=False)
        assert hit.hit_tokens == 6 * CHUNK
    text = b.call("GET", "/metrics").body.decode()
    assert metric_value(text, "kvstore_peer_pulled_chunks_total") == 4


def test_stale_entries_cost_counted_misses_never_errors(pair) -> None:
    a, b, server, prefix = pair
    ns = a.register("tenant-a")
    evicted, dead = _tokens(2, seed=3), _tokens(2, seed=4)
    a.put_chunks(ns, evicted, seed=30)
    a.put_chunks(ns, dead, seed=40)
    with server.client() as r:
        _wait_published(r, prefix, ns, "a", 4)
        chunks_a = f"{prefix}:{{{ns.id.hex()}}}:chunks:a"
        # an entry that outlived its chunk: A deleted the chunk but the index still lists it
        ghost = _tokens(1, seed=5)
        r.hset(chunks_a, prefix_keys(ns, ghost)[0], 2048)
        # an entry with a wrong size: the bytes A holds are not what was announced
        r.hset(chunks_a, prefix_keys(ns, evicted)[0], 1000)
    with Client.connect(f"kvstore://127.0.0.1:{b.port}", use_shm=False) as kv:
        kv.register(ns)
        assert kv.lookup(ns, ghost, lease=False).hit_tokens == 0
        assert _misses(b, "peer_evicted") == 1
        assert kv.lookup(ns, evicted, lease=False).hit_tokens == 0
        assert _misses(b, "size_mismatch") == 1
        a.kill()  # SIGKILL: its entries stay in the index until they expire
        t0 = time.monotonic()
        assert kv.lookup(ns, dead, lease=False).hit_tokens == 0
        assert time.monotonic() - t0 < 3.5  # bounded by the peer timeout
        assert _misses(b, "peer_unreachable") == 1
        # once A's heartbeats stop, its entries expire: the next lookup is a plain miss, not counted
        with server.client() as r:
            deadline = time.monotonic() + 10 * TTL_S
            while r.exists(chunks_a):
                assert time.monotonic() < deadline, "a dead peer's entries did not expire"
                time.sleep(0.1)
        time.sleep(2.0)  # past the peer's back-off and the cached peer list
        assert kv.lookup(ns, dead, lease=False).hit_tokens == 0
        assert _misses(b, "peer_unreachable") == 1


def test_eviction_and_deletion_withdraw_entries(tmp_path: Path, redis_server: RedisServer) -> None:
    prefix = f"kvt-{uuid.uuid4().hex[:8]}"
    a = _daemon(tmp_path, "a", redis_server.url, prefix, "--data-dir", "", "--cpu-bytes", "1MiB")
    try:
        a.start()
        ns = namespace("tenant-a")
        tokens = _tokens(700, seed=6)  # 700 chunks of 2 KiB: more than the 1 MiB CPU tier (the only tier)
        keys = prefix_keys(ns, tokens)
        with Client.connect(f"kvstore://127.0.0.1:{a.port}", use_shm=False) as kv, redis_server.client() as r:
            kv.register(ns)
            kv.put_many(ns, keys[:3], [chunk_bytes(i) for i in range(3)])
            _wait_published(r, prefix, ns, "a", 3)
            assert kv.delete_many(ns, keys[:3]) == 3
            _wait_published(r, prefix, ns, "a", 0)
            kv.put_many(ns, keys, [chunk_bytes(i) for i in range(len(keys))])
            held = set(kv.list_keys(ns, limit=1000))
            assert 0 < len(held) < len(keys)  # evicted
            _wait_published(r, prefix, ns, "a", len(held))
            entries = set(r.hkeys(f"{prefix}:{{{ns.id.hex()}}}:chunks:a"))
            assert entries == {bytes(k) for k in held}
    finally:
        a.kill()


def test_graceful_stop_withdraws_and_restarted_index_is_republished(pair) -> None:
    a, b, server, prefix = pair
    ns = a.register("tenant-a")
    a.put_chunks(ns, _tokens(2, seed=7), seed=70)
    with server.client() as r:
        _wait_published(r, prefix, ns, "a", 2)
    server.restart()  # Redis comes back empty: A's heartbeat finds its entries gone and republishes
    with server.client() as r:
        _wait_published(r, prefix, ns, "a", 2, timeout=10 * TTL_S)
        assert a.stop() == 0
        _wait_published(r, prefix, ns, "a", 0, timeout=2.0)


def test_tenants_never_see_each_others_entries(tmp_path: Path, redis_server: RedisServer) -> None:
    prefix = f"kvt-{uuid.uuid4().hex[:8]}"
    a = _daemon(tmp_path, "a", redis_server.url, prefix, tokens=True)
    b = _daemon(tmp_path, "b", redis_server.url, prefix, tokens=True)
    try:
        a.start()
        b.start()
        ns_a = a.register("tenant-a", TOKEN_A)
        tokens = _tokens(2, seed=8)
        a.put_chunks(ns_a, tokens, TOKEN_A, seed=80)
        with redis_server.client() as r:
            _wait_published(r, prefix, ns_a, "a", 2)
            assert all(ns_a.id.hex().encode() in k for k in r.keys(f"{prefix}:*"))
        with Client.connect(f"kvstore://127.0.0.1:{b.port}", token=TOKEN_B, use_shm=False) as kv:
            ns_b = kv.register(namespace("tenant-b"))
            assert kv.lookup(ns_b, tokens, lease=False).hit_tokens == 0
        with Client.connect(f"kvstore://127.0.0.1:{b.port}", token=TOKEN_A, use_shm=False) as kv:
            kv.register(ns_a)  # B pulls for tenant-a with tenant-a's own token
            assert kv.lookup(ns_a, tokens, lease=False).hit_tokens == 2 * CHUNK
        assert _misses(b, "forbidden", ADMIN_TOKEN) == 0
    finally:
        for d in (a, b):
            d.kill()


def test_redis_cluster_index(tmp_path: Path, redis_cluster: RedisClusterNodes) -> None:
    prefix = f"kvt-{uuid.uuid4().hex[:8]}"
    a = _daemon(tmp_path, "a", redis_cluster.url, prefix, "--peer-cluster")
    b = _daemon(tmp_path, "b", redis_cluster.url, prefix, "--peer-cluster")
    try:
        a.start()
        b.start()
        ns = a.register("tenant-a")
        tokens = _tokens(3, seed=9)
        a.put_chunks(ns, tokens, seed=90)
        r = redis.RedisCluster.from_url(redis_cluster.url)
        try:
            _wait_published(r, prefix, ns, "a", 3)
        finally:
            r.close()
        with Client.connect(f"kvstore://127.0.0.1:{b.port}", use_shm=False) as kv:
            kv.register(ns)
            assert kv.lookup(ns, tokens, lease=False).hit_tokens == 3 * CHUNK
    finally:
        for d in (a, b):
            d.kill()


def test_index_down_is_a_counted_miss(pair) -> None:
    a, b, server, prefix = pair
    ns = a.register("tenant-a")
    tokens = _tokens(1, seed=11)
    with Client.connect(f"kvstore://127.0.0.1:{b.port}", use_shm=False) as kv:
        kv.register(ns)
        server.kill()
        assert kv.lookup(ns, tokens, lease=False).hit_tokens == 0
    assert _misses(b, "index_unavailable") == 1


def test_peer_config_is_validated() -> None:
    cfg = load_config({"KVSTORE_PEER_TOKEN": "p" * 20}, {"data_plane__peer_index_url": "redis://h:6379/0"})
    peers = cfg.data_plane.peers
    assert peers is not None and peers.token == "p" * 20 and peers.heartbeat_s == pytest.approx(5.0)
    assert "p" * 20 not in repr(cfg) and cfg.redacted()["data_plane"]["peer_token"] == "***"  # type: ignore[index]
    assert load_config({}, {}).data_plane.peers is None  # off by default
    with pytest.raises(ValueError, match="peer_index_url"):
        load_config({}, {"data_plane__peer_index_url": "http://h"})
    with pytest.raises(ValueError, match="peer_advertise"):
        load_config({"KVSTORE_TOKENS": "t" * 20 + ":x"},
                    {"data_plane__peer_index_url": "redis://h", "data_plane__host": "0.0.0.0"})
    with pytest.raises(ValueError, match="peer_advertise|host:port"):
        load_config({}, {"data_plane__peer_index_url": "redis://h", "data_plane__peer_advertise": "h:0"})
    with pytest.raises(ValueError, match="peer_token"):
        load_config({"KVSTORE_PEER_TOKEN": "short"}, {"data_plane__peer_index_url": "redis://h"})
    with pytest.raises(ValueError, match="data plane"):
        load_config({}, {"data_plane__peer_index_url": "redis://h", "data_plane__enabled": False})
    with pytest.raises(ValueError, match="peer_ttl_s"):
        load_config({}, {"data_plane__peer_index_url": "redis://h", "data_plane__peer_ttl_s": "0"})
