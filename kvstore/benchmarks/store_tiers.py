"""The tier sections of the storage benchmark: CPU, disk and Redis tiers against their plain baselines."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import numpy as np

from kvstore.benchmarks.baselines import RawRedis, read_file_into, write_file
from kvstore.benchmarks.common import Case
from kvstore.benchmarks.local_redis import redis_url_or_local
from kvstore.benchmarks.store_run import BENCH_NS, Rows, Run, bench_key, check, expect, tier_cases
from kvstore.keys import ChunkKey
from kvstore.tiers.cpu import CPUTier, CPUTierConfig
from kvstore.tiers.store import TieredStore

if TYPE_CHECKING:
    from redis import Redis

    from kvstore.tiers.remote import RemoteTier

# -- CPU --------------------------------------------------------------------------------

_CPU_ROWS: Rows = [
    ("CPU tier put (store.put)", "cpu_put_vs_memcpy", "cpu_put", "memcpy"),
    ("CPU tier get (store.get into buffer)", "cpu_get_vs_memcpy", "cpu_get", "memcpy"),
]


def cpu_section(r: Run) -> None:
    """CPU tier through the tiered store (put: copy + checksum; get: into a caller buffer) vs memcpy."""
    store = TieredStore([CPUTier(CPUTierConfig(capacity_bytes=r.nbytes * (r.n + 2)))])
    ns = BENCH_NS
    try:
        store.register_namespace(ns)
        for i in r.ids:
            check(store.put(ns, bench_key("cpu-get", i), r.data[i]), "CPU put")

        def get(i: int) -> None:
            expect(store.get(ns, bench_key("cpu-get", i % r.n), r.out), r.nbytes, "CPU get")

        def put(i: int) -> None:
            check(store.put(ns, bench_key("cpu", i), r.chunk(i)), "CPU put")

        memcpy = Case(lambda i: np.copyto(r.out, r.chunk(i)))
        delete = Case(put, teardown=lambda i: store.delete(ns, bench_key("cpu", i)))
        t = r.time({"memcpy": memcpy, "cpu_put": delete, "cpu_get": Case(get)})
    finally:
        store.close()
    r.rates(t, _CPU_ROWS)


# -- disk -------------------------------------------------------------------------------

_DISK_ROWS: Rows = [
    ("disk tier put (sync=none)", "disk_put_vs_file", "disk_put", "file_write"),
    ("  put vs overwrite of a cached file", "disk_put_vs_file_overwrite", "disk_put", "file_overwrite"),
    ("disk tier get (page cache)", "disk_get_vs_file", "disk_get", "file_read"),
    ("  get vs copy from a mapped file", "disk_get_vs_file_mmap", "disk_get", "file_mmap_copy"),
]
_DISK_COMMIT_ROWS: Rows = [
    ("disk tier put (sync=commit)", "disk_commit_put_vs_file_fsync", "disk_commit_put", "file_fsync_write"),
]


def disk_section(r: Run) -> None:
    """Disk tier vs plain files with the same durability; reads of both are warm (page cache)."""
    try:
        from kvstore.tiers.disk import DiskTier, DiskTierConfig
    except ImportError as exc:
        r.report.note(f"disk section skipped: {exc}")
        return
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-disk-", dir=r.config.disk_dir) as root:

        def open_tier(sync: Literal["none", "commit"]) -> contextlib.closing[DiskTier]:
            cfg = DiskTierConfig(
                os.path.join(root, sync), r.nbytes * (r.n + 4), sync, max_chunk_bytes=r.nbytes
            )
            return contextlib.closing(DiskTier(config=cfg))

        files = os.path.join(root, "files")
        os.mkdir(files)
        with open_tier("none") as tier:
            t = r.time({**_file_cases(r, files, fsync=False), **tier_cases(r, tier, "disk")})
        r.rates(t, _DISK_ROWS)
        if r.config.disk_commit:
            with open_tier("commit") as tier:
                t = r.time({**_file_cases(r, files, True), **tier_cases(r, tier, "disk_commit", gets=False)})
            r.rates(t, _DISK_COMMIT_ROWS)


def _file_cases(r: Run, root: str, fsync: bool) -> dict[str, Case]:
    """write() of a new file (unlinked untimed after). Without fsync also the floors: write() over
    a cached file of the same size (no allocation), readinto from it, a copy from its mapping."""

    def path(i: int) -> str:
        return os.path.join(root, f"w{i}")

    def cached(i: int) -> str:
        return os.path.join(root, f"c{i % r.n}")

    def read(i: int) -> None:
        expect(read_file_into(cached(i), r.out), r.nbytes, "file read")

    write = Case(lambda i: write_file(path(i), r.chunk(i), fsync), teardown=lambda i: os.unlink(path(i)))
    if fsync:
        return {"file_fsync_write": write}
    for i in r.ids:
        write_file(cached(i), r.data[i])
    maps = [np.memmap(cached(i), dtype=np.uint8, mode="r") for i in r.ids]  # mapped once, as LMDB does
    return {
        "file_write": write,
        "file_overwrite": Case(lambda i: write_file(cached(i), r.chunk(i), truncate=False)),
        "file_read": Case(read),
        "file_mmap_copy": Case(lambda i: np.copyto(r.out, maps[i % r.n])),
    }


# -- Redis ------------------------------------------------------------------------------

_REDIS_ONE: Rows = [
    ("Redis tier put", "redis_put_vs_redispy", "redis_put", "redispy_set"),
    ("Redis tier get (into buffer)", "redis_get_vs_redispy", "redis_get", "redispy_get"),
    ("  put vs raw socket", "redis_put_vs_raw_socket", "redis_put", "raw_socket_set"),
    ("  get vs raw socket", "redis_get_vs_raw_socket", "redis_get", "raw_socket_get"),
]
_REDIS_MANY: Rows = [
    ("Redis put_many (all chunks)", "redis_put_many_vs_redispy", "redis_put_many", "redispy_set_seq"),
    ("Redis get_many_into (all chunks)", "redis_get_many_vs_redispy", "redis_get_many", "redispy_get_seq"),
    (
        "  get_many vs redis-py pipeline",
        "redis_get_many_vs_pipeline",
        "redis_get_many",
        "redispy_get_pipeline",
    ),
]


def redis_section(r: Run) -> None:
    """Redis tier vs redis-py SET/GET (hiredis, one connection) and a raw socket, on the same server."""
    try:
        import redis
        from redis.utils import HIREDIS_AVAILABLE

        from kvstore.tiers.remote import RemoteTier, RemoteTierConfig
    except ImportError as exc:
        r.report.note(f"redis section skipped: {exc}")
        return
    with redis_url_or_local(r.config.redis_url) as url:
        if url is None:
            r.report.note("redis section skipped: no --redis-url and no redis-server on PATH")
            return
        r.report.record("redispy_hiredis", bool(HIREDIS_AVAILABLE))
        client, raw = redis.Redis.from_url(url, socket_timeout=120), RawRedis(url)
        cfg = RemoteTierConfig(
            url, r.nbytes * (4 * r.n + 4), key_prefix="kvstore-bench:tier:", socket_timeout_s=120
        )
        tier = RemoteTier(name="redis", config=cfg)
        try:
            one = r.time({**_redispy_cases(r, client, raw), **tier_cases(r, tier, "redis")})
            many = r.time({**_redispy_batch_cases(r, client), **_remote_batch_cases(r, tier)})
        finally:
            _redis_cleanup(r, client, tier, raw)
    r.rates(one, _REDIS_ONE)
    r.rates(many, _REDIS_MANY, r.n * r.nbytes)


def _bkey(tag: str, i: int) -> str:
    return f"kvstore-bench:plain:{tag}:{i}"


def _redispy_cases(r: Run, client: Redis, raw: RawRedis) -> dict[str, Case]:
    """SET of a fresh key and GET of a stored value, by redis-py and by the raw socket client."""
    for i in r.ids:
        client.set(_bkey("get", i), r.data[i].data)

    def get(i: int) -> None:
        expect(len(client.get(_bkey("get", i % r.n)) or b""), r.nbytes, "redis-py GET")

    def raw_get(i: int) -> None:
        expect(raw.get_into(_bkey("get", i % r.n).encode(), r.out.data), r.nbytes, "raw GET")

    return {
        "redispy_set": Case(
            lambda i: client.set(_bkey("set", i), r.chunk(i).data), teardown=_unlink(client, "set")
        ),
        "redispy_get": Case(get),
        "raw_socket_set": Case(
            lambda i: raw.set(_bkey("raw", i).encode(), r.chunk(i).data), teardown=_unlink(client, "raw")
        ),
        "raw_socket_get": Case(raw_get),
    }


def _unlink(client: Redis, tag: str) -> Callable[[int], object]:
    return lambda i: client.delete(_bkey(tag, i))


def _redispy_batch_cases(r: Run, client: Redis) -> dict[str, Case]:
    """Every chunk by sequential SETs and GETs, and by one pipeline of GETs."""

    def set_all(i: int) -> None:
        for j in r.ids:
            client.set(_bkey(f"seq{i}", j), r.data[j].data)

    def get_pipelined(i: int) -> None:
        pipe = client.pipeline(transaction=False)
        for j in r.ids:
            pipe.get(_bkey("get", j))
        expect(sum(len(v) for v in pipe.execute()), r.n * r.nbytes, "pipelined GET")

    return {
        "redispy_set_seq": Case(
            set_all, teardown=lambda i: client.delete(*[_bkey(f"seq{i}", j) for j in r.ids])
        ),
        "redispy_get_seq": Case(lambda i: [client.get(_bkey("get", j)) for j in r.ids]),
        "redispy_get_pipeline": Case(get_pipelined),
    }


def _remote_batch_cases(r: Run, tier: RemoteTier) -> dict[str, Case]:
    """Every chunk by one put_many (fresh keys) and one get_many_into (the chunks _tier_cases stored)."""
    outs = [np.zeros(r.nbytes, dtype=np.uint8) for _ in r.ids]
    get_keys = [bench_key("redis-get", j) for j in r.ids]

    def put_keys(i: int) -> list[ChunkKey]:
        return [bench_key(f"redis-many-{i}", j) for j in r.ids]

    def put_many(i: int) -> None:
        check(all(tier.put_many(list(zip(put_keys(i), r.data, r.metas)))), "put_many")

    def get_many(i: int) -> None:
        expect(sum(n or 0 for n in tier.get_many_into(get_keys, outs)), r.n * r.nbytes, "get_many_into")

    return {
        "redis_put_many": Case(put_many, teardown=lambda i: [tier.delete(k) for k in put_keys(i)]),
        "redis_get_many": Case(get_many),
    }


def _redis_cleanup(r: Run, client: Redis, tier: RemoteTier, raw: RawRedis) -> None:
    """Delete what the section stored (the server may be the caller's), then close the clients."""
    try:
        for i in r.ids:
            tier.delete(bench_key("redis-get", i))
        client.delete(*[_bkey("get", i) for i in r.ids])
    finally:
        tier.close()
        client.close()
        raw.close()
