"""The store over real tiers: CPU + LMDB disk + a real redis-server.

Write-through reaches every tier; a restart finds chunks on disk; a dead
Redis costs counted misses, never an exception; a corrupt copy in one tier is
skipped for a good copy in the next; a full disk leaves the store serving.
"""

from __future__ import annotations

import time
from pathlib import Path

import lmdb
import numpy as np
import torch

from kvstore.builder import TiersConfig, build_store
from kvstore.keys import Namespace, prefix_keys
from kvstore.spec import KVSpec, ModelFingerprint
from kvstore.tiers.store import TieredStore
from tests.redis_servers import RedisServer

SPEC = KVSpec(ModelFingerprint("m"), 4, 2, 16, "bfloat16")
NS = Namespace("tenant-a", SPEC, chunk_tokens=32)
CHUNK = NS.chunk_nbytes  # 16 KiB


def chunk(i: int) -> torch.Tensor:
    return torch.randn(SPEC.chunk_shape(32), generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)


def toks(n: int, seed: int = 0) -> list[int]:
    return [seed * 7919 + i for i in range(n * 32)]


def open_store(data_dir: Path, redis_url: str | None, cpu_chunks: int = 64) -> TieredStore:
    st = build_store(
        TiersConfig(cpu_bytes=cpu_chunks * CHUNK, data_dir=str(data_dir), disk_bytes=256 * CHUNK,
                    redis_url=redis_url, redis_bytes=256 * CHUNK)
    )
    st.register_namespace(NS)
    return st


def out() -> torch.Tensor:
    return torch.empty(SPEC.chunk_shape(32), dtype=torch.bfloat16)


def test_write_through_reaches_every_tier_and_restart_finds_disk(tmp_path: Path, redis_server: RedisServer) -> None:
    with open_store(tmp_path, redis_server.url) as st:
        st.put_prefix(NS, toks(4), [chunk(i) for i in range(4)])
        st.flush()
        assert [len(list(t.keys(NS.id))) for t in st.tiers] == [4, 4, 4]
    with open_store(tmp_path, None) as st:  # restart without redis: the disk tier still has them
        r = st.lookup(NS, toks(4))
        assert r.hit_chunks == 4 and set(r.tiers) == {"disk"}
        o = out()
        assert st.get(NS, r.keys[2], o, r.lease) == CHUNK and torch.equal(o, chunk(2))
        assert st.top.contains(r.keys[2])  # promoted


def test_remote_only_chunks_are_found_by_lookup(tmp_path: Path, redis_server: RedisServer) -> None:
    with open_store(tmp_path / "a", redis_server.url) as st:
        st.put_prefix(NS, toks(3), [chunk(i) for i in range(3)])
        st.flush()
    with open_store(tmp_path / "b", redis_server.url) as other:  # another host: empty local tiers
        r = other.lookup(NS, toks(3))
        assert r.hit_chunks == 3 and set(r.tiers) == {"redis"} and r.lease is None
        o = out()
        assert other.get(NS, r.keys[0], o) == CHUNK and torch.equal(o, chunk(0))


def test_dead_redis_is_a_counted_miss_and_the_store_recovers(tmp_path: Path, redis_server: RedisServer) -> None:
    with open_store(tmp_path / "a", redis_server.url) as st:
        st.put_prefix(NS, toks(2), [chunk(0), chunk(1)])
        st.flush()
    with open_store(tmp_path / "b", redis_server.url) as st:
        redis_server.kill()
        r = st.lookup(NS, toks(2))  # no exception: the remote tier is down
        assert r.hit_chunks == 0
        assert st.get(NS, prefix_keys(NS, toks(2))[0], out()) is None
        st.put_prefix(NS, toks(1, seed=9), [chunk(9)])  # puts keep working locally
        st.flush()
        assert st.lookup(NS, toks(1, seed=9), lease=False).hit_chunks == 1
        remote = st.tiers[2].stats()
        assert remote.misses["remote_down"] >= 1
        redis_server.restart()  # empty after restart (no persistence): chunks are gone, the tier is back
        deadline = time.monotonic() + 15
        while not st.tiers[2].available and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.2)  # the tier reconnects by itself after its back-off
        st.put_prefix(NS, toks(1, seed=11), [chunk(11)])
        st.flush()
        assert st.tiers[2].contains(prefix_keys(NS, toks(1, seed=11))[0])


def test_corrupt_disk_copy_is_skipped_for_the_remote_copy(tmp_path: Path, redis_server: RedisServer) -> None:
    with open_store(tmp_path, redis_server.url) as st:
        st.put_prefix(NS, toks(1), [chunk(0)])
        st.flush()
    key = prefix_keys(NS, toks(1))[0]
    env = lmdb.open(str(tmp_path), max_dbs=8, subdir=True, lock=True)
    data_db = env.open_db(b"data", create=False)
    with env.begin(write=True) as txn:
        raw = bytearray(txn.get(key, db=data_db))
        raw[100] ^= 0xFF
        txn.put(key, bytes(raw), db=data_db)
    env.close()
    with open_store(tmp_path, redis_server.url) as st:
        o = out()
        assert st.get(NS, key, o) == CHUNK and torch.equal(o, chunk(0))  # the good remote copy
        disk = next(t for t in st.tiers if t.name == "disk").stats()
        assert disk.misses["corrupt"] == 1


def test_budgets_and_index_agree_after_churn(tmp_path: Path) -> None:
    with open_store(tmp_path, None, cpu_chunks=4) as st:
        for s in range(10):
            st.put_prefix(NS, toks(4, seed=s), [chunk(100 * s + i) for i in range(4)])
        st.flush()
        for tier in st.tiers:
            s = tier.stats()
            assert s.used_bytes <= s.capacity_bytes
        for key in list(st.index._where):  # every indexed location really holds the chunk
            for i, tier in enumerate(st.tiers):
                if st.index.where(key) >> i & 1:
                    assert tier.contains(key)
        r = st.lookup(NS, toks(4, seed=0), lease=False)
        assert r.hit_chunks == 4 and set(r.tiers) == {"disk"}
        buf = np.zeros(CHUNK, dtype=np.uint8)
        assert st.get(NS, r.keys[3], buf) == CHUNK
        assert np.array_equal(buf, chunk(3).view(torch.uint8).reshape(-1).numpy())


def test_disk_and_remote_reads_refuse_another_namespace(tmp_path: Path, redis_server: RedisServer) -> None:
    other = Namespace("tenant-b", SPEC, chunk_tokens=32)
    with open_store(tmp_path, redis_server.url, cpu_chunks=1) as st:
        st.register_namespace(other)
        st.put_prefix(NS, toks(2), [chunk(0), chunk(1)])
        st.flush()
        key = prefix_keys(NS, toks(2))[0]  # evicted from the 1-chunk CPU tier: on disk and in Redis
        assert not st.top.contains(key)
        for tier in st.tiers[1:]:
            buf = np.zeros(CHUNK, dtype=np.uint8)
            assert tier.get_into(key, buf, other.id) is None and not buf.any()
            assert tier.get_into(key, buf, NS.id) == CHUNK
        assert st.get(other, key, out()) is None


def test_lazy_checksums_reach_lower_tiers(tmp_path: Path, redis_server: RedisServer) -> None:
    from kvstore.checksum import checksum

    with open_store(tmp_path, redis_server.url) as st:
        st.put_prefix(NS, toks(1), [chunk(0)])
        st.flush()
        key = prefix_keys(NS, toks(1))[0]
        expected = checksum(chunk(0).view(torch.uint8).reshape(-1).numpy())
        for tier in st.tiers:
            meta = tier.meta(key)
            assert meta is not None and meta.checksum == expected  # the writer hashed it once for all
