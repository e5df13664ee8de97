"""The Redis/Valkey tier against real redis-server processes (tests/redis_servers.py)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from kvstore.checksum import checksum
from kvstore.errors import ChunkTooLarge, RemoteUnavailable
from kvstore.keys import ChunkKey, Namespace, NamespaceId
from kvstore.spec import KVSpec, ModelFingerprint
from kvstore.tiers.base import ChunkMeta, tier_factory
from kvstore.tiers.record import HEADER_BYTES, RecordHeader
from kvstore.tiers.remote import RemoteTier, RemoteTierConfig
from tests.redis_servers import RedisClusterNodes, RedisServer, free_port

pytestmark = pytest.mark.redis

SPEC = KVSpec(ModelFingerprint("tiny"), num_layers=2, num_kv_heads=2, head_dim=8)
NS_A = Namespace("tenant-a", SPEC).id
NS_B = Namespace("tenant-b", SPEC).id
RNG = np.random.default_rng(7)


def key(i: int, ns: NamespaceId = NS_A) -> ChunkKey:
    return ChunkKey(hashlib.sha256(ns + i.to_bytes(4, "little")).digest())


def chunk(nbytes: int, ns: NamespaceId = NS_A) -> tuple[np.ndarray, ChunkMeta]:
    data = RNG.integers(0, 256, nbytes, dtype=np.uint8)
    return data, ChunkMeta(ns, nbytes, checksum(data))


def make_tier(url: str, **overrides: object) -> RemoteTier:
    fields: dict[str, object] = {
        "url": url, "capacity_bytes": 1 << 30, "retry_interval_s": 0.1, "socket_timeout_s": 2.0
    }
    fields.update(overrides)
    return RemoteTier(RemoteTierConfig(**fields), "remote")  # type: ignore[arg-type]


@pytest.fixture
def tier(redis_server: RedisServer) -> RemoteTier:
    t = make_tier(redis_server.url)
    yield t  # type: ignore[misc]
    t.close()


def rkey(k: ChunkKey, prefix: str = "kvs:") -> bytes:
    return prefix.encode() + k.hex().encode()


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


# ---- config and registry ------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"url": "http://127.0.0.1:6379"},
        {"url": ""},
        {"url": "unix:///tmp/x.sock", "cluster": True},
        {"capacity_bytes": 0},
        {"capacity_bytes": True},
        {"key_prefix": ""},
        {"key_prefix": "kvs:{tag}:"},
        {"ttl_s": 0},
        {"ttl_s": float("nan")},
        {"socket_timeout_s": 0},
        {"connect_timeout_s": -1.0},
        {"retry_interval_s": -0.1},
        {"parallelism": 0},
        {"parallelism": 8, "max_connections": 4},
        {"max_chunk_bytes": 0},
        {"max_chunk_bytes": 512 << 20},
    ],
)
def test_bad_config_raises_value_error(overrides: dict[str, object]) -> None:
    fields: dict[str, object] = {"url": "redis://127.0.0.1:6379/0", "capacity_bytes": 1 << 20}
    fields.update(overrides)
    with pytest.raises(ValueError):
        RemoteTierConfig(**fields)  # type: ignore[arg-type]


def test_registered_as_redis_and_shared() -> None:
    assert tier_factory("redis") is RemoteTier
    assert RemoteTier.kind == "redis" and RemoteTier.shared is True


# ---- round trips --------------------------------------------------------------


def test_round_trip_numpy_torch_and_layout(tier: RemoteTier, redis_server: RedisServer) -> None:
    data, meta = chunk(100_000)
    assert tier.put(key(0), data, meta)
    out = np.zeros(200_000, dtype=np.uint8)
    assert tier.get_into(key(0), out) == data.size
    assert np.array_equal(out[: data.size], data)

    tensor = torch.randint(0, 256, (4, 1000), dtype=torch.uint8)
    tmeta = ChunkMeta(NS_A, tensor.numel(), checksum(tensor.numpy().reshape(-1)))
    assert tier.put(key(1), tensor, tmeta)  # type: ignore[arg-type]
    tout = torch.zeros(4, 1000, dtype=torch.uint8)
    assert tier.get_into(key(1), tout) == 4000  # type: ignore[arg-type]
    assert torch.equal(tout, tensor)

    # one Redis value: header + payload, under prefix + hex key, no TTL
    raw = redis_server.client().get(rkey(key(0)))
    assert raw == RecordHeader(key(0), NS_A, data.size, meta.checksum).pack() + data.tobytes()
    assert redis_server.client().pttl(rkey(key(0))) == -1

    copy, rmeta = tier.read(key(0))  # type: ignore[misc]
    assert np.array_equal(copy, data) and copy.flags.writeable
    assert rmeta == tier.meta(key(0)) == ChunkMeta(NS_A, data.size, meta.checksum)
    assert tier.contains(key(0)) and not tier.contains(key(9))
    assert tier.meta(key(9)) is None
    s = tier.stats()
    assert (s.puts, s.hits, s.entries) == (2, 3, 2)
    assert s.used_bytes == 2 * HEADER_BYTES + data.size + 4000


def test_large_chunk_round_trip(tier: RemoteTier) -> None:
    data, meta = chunk(32 << 20)
    assert tier.put(key(0), data, meta)
    out = np.empty(32 << 20, dtype=np.uint8)
    assert tier.get_into(key(0), out) == data.size
    assert np.array_equal(out, data)


def test_many_small_and_empty_chunks_in_one_batch(tier: RemoteTier) -> None:
    sizes = [0, 1, 7] + [int(n) for n in RNG.integers(0, 3000, 200)]
    items = [(key(i), *chunk(n)) for i, n in enumerate(sizes)]
    assert all(tier.put_many(items))
    outs = [np.empty(3000, dtype=np.uint8) for _ in items]
    assert tier.get_many_into([k for k, _, _ in items], outs) == sizes
    for out, (_, data, _) in zip(outs, items):
        assert np.array_equal(out[: data.size], data)


def test_get_many_mixes_hits_absent_and_too_small(tier: RemoteTier, redis_server: RedisServer) -> None:
    items = [(key(i), *chunk(5000 + i)) for i in range(3)]
    assert tier.put_many(items) == [True] * 3
    outs = [np.empty(n, np.uint8) for n in (6000, 6000, 100, 6000)]
    got = tier.get_many_into([key(0), key(99), key(2), key(1)], outs)
    assert got == [5000, None, None, 5001]
    misses = tier.stats().misses
    assert misses["absent"] == 1 and misses["too_small"] == 1
    assert redis_server.client().exists(rkey(key(2)))  # too small is the caller's problem, not the value's


def test_count_leading_is_one_pipelined_round_trip(tier: RemoteTier, redis_server: RedisServer) -> None:
    for i in (0, 1, 3):
        tier.put(key(i), *chunk(64))
    assert tier.count_leading([]) == 0
    assert tier.count_leading([key(0), key(1), key(2), key(3)]) == 2
    assert tier.count_leading([key(2), key(0)]) == 0
    with redis_server.client() as c:
        before = int(c.info("stats")["total_commands_processed"])
        calls_before = c.info("commandstats").get("cmdstat_exists", {}).get("calls", 0)
        assert tier.count_leading([key(0), key(1), key(3)]) == 3
        assert c.info("commandstats")["cmdstat_exists"]["calls"] - calls_before == 3
        assert int(c.info("stats")["total_commands_processed"]) - before <= 6  # 3 EXISTS + our INFOs


def test_pin_is_contains_and_unpin_is_a_noop(tier: RemoteTier) -> None:
    tier.put(key(0), *chunk(10))
    assert tier.pin(key(0)) and not tier.pin(key(1))
    tier.unpin(key(0))
    tier.unpin(key(1))  # never raises: Redis values are not pinned


def test_second_instance_reads_what_the_first_wrote(tier: RemoteTier, redis_server: RedisServer) -> None:
    other = make_tier(redis_server.url)
    try:
        data, meta = chunk(4096)
        assert tier.put(key(0), data, meta)
        out = np.empty(4096, np.uint8)
        assert other.get_into(key(0), out) == 4096 and np.array_equal(out, data)
        assert other.stats().used_bytes == 0  # the budget counts only what this instance wrote
    finally:
        other.close()


def test_unix_socket_url(redis_server: RedisServer) -> None:
    t = make_tier(redis_server.unix_url)
    try:
        data, meta = chunk(70_000)
        assert t.put(key(0), data, meta)
        out = np.empty(70_000, np.uint8)
        assert t.get_into(key(0), out) == 70_000 and np.array_equal(out, data)
    finally:
        t.close()


# ---- corruption -----------------------------------------------------------------


def _flip(raw: bytes, at: int) -> bytes:
    b = bytearray(raw)
    b[at] ^= 0x40
    return bytes(b)


CORRUPTIONS: dict[str, Callable[[bytes, bytes], bytes]] = {
    "payload byte": lambda raw, other: _flip(raw, HEADER_BYTES + 777),
    "last payload byte": lambda raw, other: _flip(raw, len(raw) - 1),
    "header length byte": lambda raw, other: _flip(raw, 9),
    "header key byte": lambda raw, other: _flip(raw, 40),
    "truncated payload": lambda raw, other: raw[:-10],
    "truncated header": lambda raw, other: raw[:50],
    "extra bytes": lambda raw, other: raw + b"xx",
    "another key's value": lambda raw, other: other,
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
@pytest.mark.parametrize("via", ["get_into", "get_many_into", "read"])
def test_corrupt_values_are_counted_deleted_and_never_returned(
    tier: RemoteTier, redis_server: RedisServer, how: str, via: str
) -> None:
    data, meta = chunk(20_000)
    other, ometa = chunk(20_000)
    tier.put(key(0), data, meta)
    tier.put(key(1), other, ometa)
    c = redis_server.client()
    c.set(rkey(key(0)), CORRUPTIONS[how](c.get(rkey(key(0))), c.get(rkey(key(1)))))
    out = np.empty(30_000, np.uint8)
    if via == "get_into":
        assert tier.get_into(key(0), out) is None
    elif via == "get_many_into":
        assert tier.get_many_into([key(1), key(0)], [np.empty(30_000, np.uint8), out])[1] is None
    else:
        assert tier.read(key(0)) is None
    assert tier.stats().misses["corrupt"] == 1
    assert not c.exists(rkey(key(0)))  # the bad value is gone
    assert c.exists(rkey(key(1)))
    assert tier.stats().used_bytes == HEADER_BYTES + other.size  # and out of the budget


def test_foreign_value_types_are_corrupt(tier: RemoteTier, redis_server: RedisServer) -> None:
    c = redis_server.client()
    c.rpush(rkey(key(0)), b"not a chunk")
    c.set(rkey(key(1)), b"short")
    assert tier.get_many_into([key(0), key(1)], [np.empty(10, np.uint8)] * 2) == [None, None]
    assert tier.stats().misses["corrupt"] == 2
    assert tier.meta(key(2)) is None and tier.stats().misses["corrupt"] == 2


def test_meta_detects_a_bad_header_or_length(tier: RemoteTier, redis_server: RedisServer) -> None:
    tier.put(key(0), *chunk(1000))
    tier.put(key(1), *chunk(1000))
    c = redis_server.client()
    c.set(rkey(key(0)), _flip(c.get(rkey(key(0))), 70))
    c.append(rkey(key(1)), b"tail")
    assert tier.meta(key(0)) is None and tier.meta(key(1)) is None
    assert tier.stats().misses["corrupt"] == 2
    assert c.exists(rkey(key(0)), rkey(key(1))) == 0


def test_put_refuses_bytes_that_fail_their_checksum(tier: RemoteTier, redis_server: RedisServer) -> None:
    data, meta = chunk(1000)
    data[3] ^= 1
    assert tier.put(key(0), data, meta) is False
    assert tier.stats().rejected == 1 and tier.stats().used_bytes == 0
    assert not redis_server.client().exists(rkey(key(0)))


# ---- budget, size limits, TTL, namespaces ---------------------------------------------


def test_budget_evicts_own_lru_writes(redis_server: RedisServer) -> None:
    size = 10_000
    t = make_tier(redis_server.url, capacity_bytes=3 * (HEADER_BYTES + size))
    evicted: list[ChunkKey] = []
    t.add_evict_listener(lambda k, m, d: evicted.append(k))
    try:
        for i in range(3):
            assert t.put(key(i), *chunk(size))
        assert t.get_into(key(0), np.empty(size, np.uint8)) == size  # key 0 is now the most recent
        assert t.put(key(3), *chunk(size))
        s = t.stats()
        assert evicted == [key(1)] and s.evictions == 1
        assert s.used_bytes == 3 * (HEADER_BYTES + size) <= s.capacity_bytes and s.entries == 3
        c = redis_server.client()
        assert not c.exists(rkey(key(1))) and c.exists(rkey(key(0)), rkey(key(2)), rkey(key(3))) == 3
        # larger than the whole budget: rejected, nothing evicted
        assert t.put(key(4), *chunk(4 * size)) is False
        assert t.stats().rejected == 1 and t.stats().evictions == 1
    finally:
        t.close()


def test_oversized_chunk_raises_chunk_too_large(redis_server: RedisServer) -> None:
    t = make_tier(redis_server.url, max_chunk_bytes=1000)
    try:
        with pytest.raises(ChunkTooLarge, match="max_chunk_bytes=1000"):
            t.put(key(0), *chunk(1001))
        with pytest.raises(ChunkTooLarge):
            t.put_many([(key(1), *chunk(10)), (key(2), *chunk(5000))])
        assert t.stats().rejected == 2
        assert redis_server.client().dbsize() == 0  # validation happens before anything is sent
        assert t.put(key(3), *chunk(1000))
    finally:
        t.close()


def test_ttl_expires_values_in_redis(redis_server: RedisServer) -> None:
    t = make_tier(redis_server.url, ttl_s=0.3)
    try:
        assert t.put(key(0), *chunk(500))
        assert 0 < redis_server.client().pttl(rkey(key(0))) <= 300
        time.sleep(0.45)
        assert t.get_into(key(0), np.empty(500, np.uint8)) is None
        s = t.stats()
        assert s.misses["expired"] == 1 and s.used_bytes == 0 and s.entries == 0
    finally:
        t.close()


def test_value_evicted_by_redis_maxmemory_is_an_evicted_miss(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    lru = ("--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru")
    server = redis_server_factory(extra_args=lru).start()
    t = make_tier(server.url)
    try:
        for i in range(20):
            t.put(key(i), *chunk(500_000))
        got = t.get_many_into([key(i) for i in range(20)], [np.empty(500_000, np.uint8) for _ in range(20)])
        lost = got.count(None)
        assert lost > 0 and t.stats().misses["evicted"] == lost
    finally:
        t.close()


def test_keys_and_clear_isolate_namespaces_and_prefixes(tier: RemoteTier, redis_server: RedisServer) -> None:
    other_prefix = make_tier(redis_server.url, key_prefix="other:")
    try:
        a = {key(i, NS_A) for i in range(5)}
        b = {key(i, NS_B) for i in range(3)}
        for k in a:
            tier.put(k, *chunk(100, NS_A))
        for k in b:
            tier.put(k, *chunk(100, NS_B))
        other_prefix.put(key(0, NS_A), *chunk(100, NS_A))
        redis_server.client().set(b"kvs:not-a-chunk", b"x")
        assert set(tier.keys(NS_A)) == a and set(tier.keys(NS_B)) == b
        assert set(tier.keys()) == a | b
        assert tier.clear(NS_A) == 5
        assert set(tier.keys()) == b and tier.count_leading(sorted(b)) == 3
        assert tier.stats().used_bytes == 3 * (HEADER_BYTES + 100)
        assert tier.clear() == 3 and list(tier.keys()) == []
        assert list(other_prefix.keys()) == [key(0, NS_A)]
        assert redis_server.client().exists(b"kvs:not-a-chunk")
    finally:
        other_prefix.close()


# ---- Redis down ---------------------------------------------------------------------


def test_killed_server_counts_remote_down_and_recovers(tier: RemoteTier, redis_server: RedisServer) -> None:
    data, meta = chunk(50_000)
    assert tier.put(key(0), data, meta)
    out = np.empty(50_000, np.uint8)
    redis_server.kill()
    assert tier.get_into(key(0), out) is None
    assert not tier.available
    start = time.monotonic()
    assert tier.contains(key(0)) is False
    assert tier.count_leading([key(0)]) == 0
    assert tier.get_many_into([key(0), key(1)], [out, out]) == [None, None]
    assert tier.meta(key(0)) is None and tier.read(key(0)) is None
    assert tier.put(key(1), data, meta) is False
    assert tier.delete(key(0)) is False
    assert time.monotonic() - start < 0.5  # fails fast while backing off
    with pytest.raises(RemoteUnavailable):
        list(tier.keys())
    s = tier.stats()
    assert s.misses["remote_down"] == 7 and s.rejected == 1 and s.hits == 0

    redis_server.restart()  # same port, empty
    wait_until(lambda: tier.available)
    assert tier.get_into(key(0), out) is None  # the data died with the server
    assert tier.stats().misses["evicted"] == 1
    assert tier.put(key(0), data, meta) and tier.get_into(key(0), out) == data.size


def test_server_killed_mid_run_never_raises_in_the_data_path(redis_server: RedisServer) -> None:
    t = make_tier(redis_server.url, parallelism=2)
    items = [(key(i), *chunk(200_000)) for i in range(4)]
    outs = [np.empty(200_000, np.uint8) for _ in items]
    errors: list[BaseException] = []
    hits_after_restart: list[int] = []
    restarted = threading.Event()
    stop = threading.Event()

    def worker() -> None:
        try:
            while not stop.is_set():
                t.put_many(items)
                got = t.get_many_into([k for k, _, _ in items], outs)
                t.count_leading([k for k, _, _ in items])
                if restarted.is_set():
                    hits_after_restart.append(sum(g is not None for g in got))
        except BaseException as exc:  # noqa: BLE001 - the test is that nothing escapes
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        time.sleep(0.3)
        redis_server.kill()
        time.sleep(0.4)
        redis_server.start()
        restarted.set()
        wait_until(lambda: sum(hits_after_restart) > 0, timeout=5)
    finally:
        stop.set()
        thread.join(10)
        t.close()
    assert not errors
    assert t.stats().misses["remote_down"] > 0 and t.stats().rejected > 0


def test_paused_server_times_out_as_remote_down(redis_server: RedisServer) -> None:
    t = make_tier(redis_server.url, socket_timeout_s=0.3, retry_interval_s=0.1)
    try:
        data, meta = chunk(1000)
        assert t.put(key(0), data, meta)
        redis_server.pause()
        start = time.monotonic()
        assert t.get_into(key(0), np.empty(1000, np.uint8)) is None
        assert time.monotonic() - start < 2.0
        assert t.stats().misses["remote_down"] == 1 and not t.available
        redis_server.resume()
        wait_until(lambda: t.available)
        assert t.get_into(key(0), np.empty(1000, np.uint8)) == 1000
    finally:
        redis_server.resume()
        t.close()


def test_refused_at_construction_starts_down_then_comes_up(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    port = free_port()
    t = make_tier(f"redis://127.0.0.1:{port}/0", retry_interval_s=0.1)
    try:
        assert not t.available
        assert t.get_into(key(0), np.empty(10, np.uint8)) is None
        assert t.put(key(0), *chunk(10)) is False
        assert t.stats().misses["remote_down"] == 1
        redis_server_factory(port).start()
        wait_until(lambda: t.available)
        data, meta = chunk(10)
        assert t.put(key(0), data, meta)
        assert t.get_into(key(0), np.empty(10, np.uint8)) == 10
    finally:
        t.close()


def test_closed_tier_answers_misses(redis_server: RedisServer) -> None:
    t = make_tier(redis_server.url)
    t.close()
    t.close()
    assert not t.available
    assert t.get_into(key(0), np.empty(10, np.uint8)) is None
    assert t.put(key(0), *chunk(10)) is False


# ---- Cluster --------------------------------------------------------------------------


def test_cluster_put_get_count_clear_spread_over_nodes(redis_cluster: RedisClusterNodes) -> None:
    prefix = "kvs-cluster-test:"
    t = make_tier(redis_cluster.url, cluster=True, key_prefix=prefix, parallelism=3)
    try:
        items = [(key(i), *chunk(50_000 + i)) for i in range(24)]
        assert all(t.put_many(items))
        keys = [k for k, _, _ in items]
        outs = [np.empty(60_000, np.uint8) for _ in items]
        assert t.get_many_into(keys, outs) == [50_000 + i for i in range(24)]
        assert all(np.array_equal(o[: d.size], d) for o, (_, d, _) in zip(outs, items))
        assert t.count_leading(keys + [key(99)] + keys) == 24
        assert t.meta(keys[5]) == items[5][2]
        per_node = []
        for node in redis_cluster.nodes:
            with node.client() as c:
                per_node.append(sum(1 for _ in c.scan_iter(match=f"{prefix}*")))
        assert sum(per_node) == 24 and sum(n > 0 for n in per_node) > 1
        assert set(t.keys(NS_A)) == set(keys) and list(t.keys(NS_B)) == []
        assert t.clear(NS_A) == 24
        assert t.count_leading(keys) == 0 and list(t.keys()) == []
    finally:
        t.close()


def test_cluster_redirects_fall_back_to_redis_py(
    redis_cluster: RedisClusterNodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Framed GET/SET sent to the wrong node get MOVED; redis-py then redoes them correctly."""
    from kvstore.tiers import remote

    prefix = "kvs-moved-test:"
    t = make_tier(redis_cluster.url, cluster=True, key_prefix=prefix)
    try:
        client = t._client_now()
        owner = client.get_node_from_key(t._rkey(key(0)))  # key 0 goes direct, others get MOVED
        wrong = client.get_redis_connection(owner).connection_pool
        monkeypatch.setattr(remote, "_pool_for", lambda c, rk: wrong)
        redirected: list[bytes] = []
        for name in ("_set_quietly", "_get_quietly"):
            real = getattr(remote, name)
            spy = lambda c, x, *rest, _f=real: redirected.append(x) or _f(c, x, *rest)
            monkeypatch.setattr(remote, name, spy)
        items = [(key(i), *chunk(1000 + i)) for i in range(12)]
        assert all(t.put_many(items))
        outs = [np.empty(2000, np.uint8) for _ in items]
        assert t.get_many_into([k for k, _, _ in items], outs) == [1000 + i for i in range(12)]
        assert all(np.array_equal(o[: d.size], d) for o, (_, d, _) in zip(outs, items))
        assert 0 < len(redirected) < 24  # the keys of the other nodes went through redis-py, twice each
        assert t.clear() == 12
    finally:
        t.close()


def test_connection_without_socket_reads_through_redis_py(
    tier: RemoteTier, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection exposing no ``_sock``: GETs fall back to redis-py, verified; the tier stays up."""
    from types import SimpleNamespace

    from kvstore.tiers import remote, resp

    assert resp.socket_of(SimpleNamespace()) is None  # type: ignore[arg-type]
    assert resp.socket_of(SimpleNamespace(_sock=object())) is None  # type: ignore[arg-type]
    real_socket_of, real_get = resp.socket_of, remote._get_quietly
    monkeypatch.setattr(resp, "socket_of", lambda conn: real_socket_of(SimpleNamespace()))
    fetched: list[bytes] = []
    monkeypatch.setattr(remote, "_get_quietly", lambda c, rk: fetched.append(rk) or real_get(c, rk))
    items = [(key(i), *chunk(1000 + i)) for i in range(6)]
    assert all(tier.put_many(items))
    outs = [np.empty(2000, np.uint8) for _ in items]
    assert tier.get_many_into([k for k, _, _ in items], outs) == [1000 + i for i in range(6)]
    assert all(np.array_equal(o[: d.size], d) for o, (_, d, _) in zip(outs, items))
    got = tier.read(key(0))
    assert got is not None and np.array_equal(got[0], items[0][1])
    assert tier.get_into(key(99), outs[0]) is None  # absent
    assert tier.get_into(key(1), np.empty(10, np.uint8)) is None  # too small
    redis_server.client().set(rkey(key(7)), b"not a record")
    assert tier.get_into(key(7), outs[0]) is None and not redis_server.client().exists(rkey(key(7)))
    s = tier.stats()
    assert s.hits == 7 and s.misses["remote_down"] == 0 and tier.available
    assert s.misses["absent"] == 1 and s.misses["too_small"] == 1 and s.misses["corrupt"] == 1
    assert len(fetched) == 10  # every read went through redis-py
