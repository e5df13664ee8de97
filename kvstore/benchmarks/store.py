"""`kvstore bench store`: each tier against the plain operation it stands on, in one run.

All measurements use the same random bytes: ``--chunks`` chunks of
``--chunk-mib`` MiB (default: one 256-token chunk of Llama-3-8B in bf16,
32 layers x K,V x 256 tokens x 8 kv heads x 128 head dim x 2 bytes = 32 MiB).
A timed run moves one chunk (a batched run moves all of them); a tier and its
baselines run interleaved, and each figure is the median of ``--iters`` runs
after ``--warmup`` runs.

=========================  ========================================================
kvstore                    baseline measured in the same run
=========================  ========================================================
CPU tier put / get         ``np.copyto`` into a preallocated buffer (memcpy)
disk tier put / get        ``write()`` of a new file (+ ``fsync`` for
                           ``sync="commit"``), and over a cached file of the
                           same size / ``readinto`` from the page cache, and a
                           copy from an ``mmap`` of it
Redis tier put / get       redis-py (hiredis) SET / GET on one connection, and a
                           raw-socket RESP client, against the same server
prefix lookup (128k tok.)  ``hashlib.sha256(tokens.tobytes())``
index / tier metadata      none: bytes per entry traced with tracemalloc
=========================  ========================================================

Throughput ratios are kvstore / baseline (higher is better, 1.0 = as fast as
the baseline); the lookup ratios are time ratios (lower is better).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from kvstore.benchmarks.common import (
    Case,
    RawRedis,
    Report,
    Timing,
    add_common_arguments,
    finish,
    measure_interleaved,
    positive_float,
    positive_int,
    progress,
    quick_default,
    read_file_into,
    redis_url_or_local,
    traced_bytes,
    write_file,
)
from kvstore.buffers import U8
from kvstore.checksum import checksum
from kvstore.index.prefix import PrefixIndex
from kvstore.keys import ChunkKey, Namespace, prefix_keys
from kvstore.spec import KVSpec, ModelFingerprint
from kvstore.tiers.base import ChunkMeta
from kvstore.tiers.cpu import CPUTier, CPUTierConfig
from kvstore.tiers.store import TieredStore

if TYPE_CHECKING:
    from redis import Redis

    from kvstore.tiers.remote import RemoteTier

LLAMA3_8B = KVSpec(ModelFingerprint("meta-llama/Meta-Llama-3-8B"), 32, 8, 128)
BENCH_NS = Namespace("kvstore-bench", LLAMA3_8B)
SECTIONS = ("cpu", "disk", "redis", "lookup", "memory")
MIB = 1 << 20
TINY_CHUNK = 64  # bytes of the placeholder chunks behind lookups and metadata counts
Rows = list[tuple[str, str, str, str]]  # (label, ratio key, ours, baseline)


@dataclass(frozen=True, slots=True)
class StoreBenchConfig:
    """What one run of the storage benchmark measures.

    Attributes:
        chunks: distinct chunks of random bytes; timed runs cycle through them.
        chunk_bytes: size of each chunk.
        iters: timed runs per measurement (the median is reported).
        warmup: untimed runs before them.
        prompt_tokens: length of the prompt looked up (all of its full chunks cached).
        index_entries: entries of the prefix index whose memory is traced.
        meta_entries: chunks put in a CPU tier whose metadata memory is traced.
        disk_dir: directory for the disk tier and baseline files (None: the system temp dir).
        disk_commit: also compare ``sync="commit"`` with ``write()`` + ``fsync``.
        redis_url: Redis to use; None starts a private redis-server when one is on PATH.
        skip: sections (of SECTIONS) not to run.
        seed: seed of the random bytes and tokens.
        show_progress: draw a progress bar on stderr (when it is a terminal).
    """

    chunks: int = 8
    chunk_bytes: int = BENCH_NS.chunk_nbytes
    iters: int = 10
    warmup: int = 2
    prompt_tokens: int = 131072
    index_entries: int = 1_000_000
    meta_entries: int = 100_000
    disk_dir: str | None = None
    disk_commit: bool = True
    redis_url: str | None = None
    skip: frozenset[str] = frozenset()
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        for name in ("chunks", "chunk_bytes", "iters", "index_entries", "meta_entries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")
        if self.prompt_tokens < BENCH_NS.chunk_tokens:
            raise ValueError(f"prompt_tokens must be at least one chunk ({BENCH_NS.chunk_tokens})")
        if unknown := self.skip - set(SECTIONS):
            raise ValueError(f"unknown sections {sorted(unknown)}; known: {SECTIONS}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StoreBenchConfig:
        """The config the flags ask for; ``--quick`` changes the defaults of unset flags."""
        q = bool(args.quick)
        return cls(
            chunks=quick_default(args.chunks, 8, 2, q),
            chunk_bytes=int(quick_default(args.chunk_mib, 32.0, 1.0, q) * MIB),
            iters=quick_default(args.iters, 10, 3, q),
            warmup=quick_default(args.warmup, 2, 1, q),
            prompt_tokens=args.prompt_tokens,
            index_entries=quick_default(args.index_entries, 1_000_000, 20_000, q),
            meta_entries=quick_default(args.meta_entries, 100_000, 5_000, q),
            disk_dir=args.disk_dir,
            disk_commit=not (args.no_fsync or q),
            redis_url=args.redis_url,
            skip=frozenset(args.skip or ()),
            seed=args.seed,
            show_progress=not args.no_progress,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``kvstore bench store`` to ``parser``."""
    add_common_arguments(parser, iters=10, warmup=2, quick_iters=3, quick_warmup=1)
    add = parser.add_argument
    add("--chunks", type=positive_int, help="distinct chunks of random bytes (default 8; --quick 2)")
    add(
        "--chunk-mib",
        type=positive_float,
        help="MiB per chunk (default 32 = 256 tokens of Llama-3-8B; --quick 1)",
    )
    add(
        "--prompt-tokens",
        type=positive_int,
        default=131072,
        help="tokens of the looked-up prompt (default 131072)",
    )
    add("--index-entries", type=positive_int, help="prefix index entries traced (default 1e6; --quick 2e4)")
    add("--meta-entries", type=positive_int, help="CPU tier entries traced (default 1e5; --quick 5e3)")
    add("--disk-dir", help="directory for the disk tier and the baseline files (default: a temp dir)")
    add("--no-fsync", action="store_true", help="skip sync='commit' vs write()+fsync (skipped with --quick)")
    add("--redis-url", help="Redis to use (default: start a private redis-server on a free port)")
    add("--skip", action="append", choices=SECTIONS, help="a section not to run (repeatable)")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed flags describe; print lines, a table and (--json) JSON.

    Returns:
        The process exit status, 0; errors propagate as exceptions.
    """
    report = bench_store(StoreBenchConfig.from_args(args))
    finish(report, bool(args.json))
    return 0


def bench_store(config: StoreBenchConfig) -> Report:
    """Every section not skipped, on the same chunks; returns the report."""
    report = Report()
    for key in ("chunk_bytes", "chunks", "iters", "warmup"):
        report.record(key, getattr(config, key))
    todo = [s for s in SECTIONS if s not in config.skip]
    with progress(len(todo), "bench store", config.show_progress) as bar:
        r = _Run(config, report)
        for name in todo:
            bar.set_postfix_str(name)
            _SECTIONS[name](r)
            bar.update(1)
    return report


class _Run:
    """The chunks (with the metas a store passes down), the output buffer and the report of one run."""

    def __init__(self, config: StoreBenchConfig, report: Report) -> None:
        self.config = config
        self.report = report
        self.nbytes = config.chunk_bytes
        self.n = config.chunks
        self.ids = range(self.n)

    @functools.cached_property
    def data(self) -> list[U8]:
        """The random chunks, made on first use (the lookup and memory sections need none)."""
        rng = np.random.default_rng(self.config.seed)
        return [np.frombuffer(rng.bytes(self.nbytes), dtype=np.uint8) for _ in self.ids]

    @functools.cached_property
    def metas(self) -> list[ChunkMeta]:
        return [ChunkMeta(BENCH_NS.id, self.nbytes, checksum(d)) for d in self.data]

    @functools.cached_property
    def out(self) -> U8:
        return np.zeros(self.nbytes, dtype=np.uint8)  # zeros, so its pages are faulted in now

    def chunk(self, i: int) -> U8:
        return self.data[i % self.n]

    def meta(self, i: int) -> ChunkMeta:
        return self.metas[i % self.n]

    def time(self, cases: Mapping[str, Case], iters: int | None = None) -> dict[str, Timing]:
        return measure_interleaved(cases, iters=iters or self.config.iters, warmup=self.config.warmup)

    def rates(self, t: Mapping[str, Timing], rows: Rows, nbytes: int = 0) -> None:
        for label, ratio_key, ours, base in rows:
            self.report.compare_rates(label, ratio_key, t, ours, base, nbytes or self.nbytes)


def _key(tag: str, i: int) -> ChunkKey:
    """A distinct 32-byte key per (tag, i): fresh keys make every put really copy."""
    return ChunkKey(hashlib.sha256(f"kvstore-bench/{tag}/{i}".encode()).digest())


class _ByteTier(Protocol):
    """What the disk and Redis sections use of a tier: the Tier ABC's byte operations."""

    def put(self, key: ChunkKey, data: U8, meta: ChunkMeta) -> bool: ...
    def get_into(self, key: ChunkKey, out: U8) -> int | None: ...
    def delete(self, key: ChunkKey) -> bool: ...


def _tier_cases(r: _Run, tier: _ByteTier, tag: str, gets: bool = True) -> dict[str, Case]:
    """``<tag>_put`` of a fresh key (deleted untimed after); ``<tag>_get`` of a stored chunk into r.out."""

    def put(i: int) -> None:
        _check(tier.put(_key(tag, i), r.chunk(i), r.meta(i)), f"{tag} put")

    def get(i: int) -> None:
        _expect(tier.get_into(_key(tag + "-get", i % r.n), r.out), r.nbytes, f"{tag} get")

    for i in r.ids if gets else ():
        _check(tier.put(_key(tag + "-get", i), r.data[i], r.meta(i)), f"{tag} put")
    cases = {f"{tag}_put": Case(put, teardown=lambda i: tier.delete(_key(tag, i)))}
    return {**cases, f"{tag}_get": Case(get)} if gets else cases


# -- CPU --------------------------------------------------------------------------------

_CPU_ROWS: Rows = [
    ("CPU tier put (store.put)", "cpu_put_vs_memcpy", "cpu_put", "memcpy"),
    ("CPU tier get (store.get into buffer)", "cpu_get_vs_memcpy", "cpu_get", "memcpy"),
]


def _cpu_section(r: _Run) -> None:
    """CPU tier through the tiered store (put: copy + checksum; get: into a caller buffer) vs memcpy."""
    store = TieredStore([CPUTier(CPUTierConfig(capacity_bytes=r.nbytes * (r.n + 2)))])
    ns = BENCH_NS
    try:
        store.register_namespace(ns)
        for i in r.ids:
            _check(store.put(ns, _key("cpu-get", i), r.data[i]), "CPU put")

        def get(i: int) -> None:
            _expect(store.get(ns, _key("cpu-get", i % r.n), r.out), r.nbytes, "CPU get")

        def put(i: int) -> None:
            _check(store.put(ns, _key("cpu", i), r.chunk(i)), "CPU put")

        memcpy = Case(lambda i: np.copyto(r.out, r.chunk(i)))
        delete = Case(put, teardown=lambda i: store.delete(ns, _key("cpu", i)))
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


def _disk_section(r: _Run) -> None:
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
            t = r.time({**_file_cases(r, files, fsync=False), **_tier_cases(r, tier, "disk")})
        r.rates(t, _DISK_ROWS)
        if r.config.disk_commit:
            with open_tier("commit") as tier:
                t = r.time({**_file_cases(r, files, True), **_tier_cases(r, tier, "disk_commit", gets=False)})
            r.rates(t, _DISK_COMMIT_ROWS)


def _file_cases(r: _Run, root: str, fsync: bool) -> dict[str, Case]:
    """write() of a new file (unlinked untimed after). Without fsync also the floors: write() over
    a cached file of the same size (no allocation), readinto from it, a copy from its mapping."""

    def path(i: int) -> str:
        return os.path.join(root, f"w{i}")

    def cached(i: int) -> str:
        return os.path.join(root, f"c{i % r.n}")

    def read(i: int) -> None:
        _expect(read_file_into(cached(i), r.out), r.nbytes, "file read")

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


def _redis_section(r: _Run) -> None:
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
            one = r.time({**_redispy_cases(r, client, raw), **_tier_cases(r, tier, "redis")})
            many = r.time({**_redispy_batch_cases(r, client), **_remote_batch_cases(r, tier)})
        finally:
            _redis_cleanup(r, client, tier, raw)
    r.rates(one, _REDIS_ONE)
    r.rates(many, _REDIS_MANY, r.n * r.nbytes)


def _bkey(tag: str, i: int) -> str:
    return f"kvstore-bench:plain:{tag}:{i}"


def _redispy_cases(r: _Run, client: Redis, raw: RawRedis) -> dict[str, Case]:
    """SET of a fresh key and GET of a stored value, by redis-py and by the raw socket client."""
    for i in r.ids:
        client.set(_bkey("get", i), r.data[i].data)

    def get(i: int) -> None:
        _expect(len(client.get(_bkey("get", i % r.n)) or b""), r.nbytes, "redis-py GET")

    def raw_get(i: int) -> None:
        _expect(raw.get_into(_bkey("get", i % r.n).encode(), r.out.data), r.nbytes, "raw GET")

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


def _redispy_batch_cases(r: _Run, client: Redis) -> dict[str, Case]:
    """Every chunk by sequential SETs and GETs, and by one pipeline of GETs."""

    def set_all(i: int) -> None:
        for j in r.ids:
            client.set(_bkey(f"seq{i}", j), r.data[j].data)

    def get_pipelined(i: int) -> None:
        pipe = client.pipeline(transaction=False)
        for j in r.ids:
            pipe.get(_bkey("get", j))
        _expect(sum(len(v) for v in pipe.execute()), r.n * r.nbytes, "pipelined GET")

    return {
        "redispy_set_seq": Case(
            set_all, teardown=lambda i: client.delete(*[_bkey(f"seq{i}", j) for j in r.ids])
        ),
        "redispy_get_seq": Case(lambda i: [client.get(_bkey("get", j)) for j in r.ids]),
        "redispy_get_pipeline": Case(get_pipelined),
    }


def _remote_batch_cases(r: _Run, tier: RemoteTier) -> dict[str, Case]:
    """Every chunk by one put_many (fresh keys) and one get_many_into (the chunks _tier_cases stored)."""
    outs = [np.zeros(r.nbytes, dtype=np.uint8) for _ in r.ids]
    get_keys = [_key("redis-get", j) for j in r.ids]

    def put_keys(i: int) -> list[ChunkKey]:
        return [_key(f"redis-many-{i}", j) for j in r.ids]

    def put_many(i: int) -> None:
        _check(all(tier.put_many(list(zip(put_keys(i), r.data, r.metas)))), "put_many")

    def get_many(i: int) -> None:
        _expect(sum(n or 0 for n in tier.get_many_into(get_keys, outs)), r.n * r.nbytes, "get_many_into")

    return {
        "redis_put_many": Case(put_many, teardown=lambda i: [tier.delete(k) for k in put_keys(i)]),
        "redis_get_many": Case(get_many),
    }


def _redis_cleanup(r: _Run, client: Redis, tier: RemoteTier, raw: RawRedis) -> None:
    """Delete what the section stored (the server may be the caller's), then close the clients."""
    try:
        for i in r.ids:
            tier.delete(_key("redis-get", i))
        client.delete(*[_bkey("get", i) for i in r.ids])
    finally:
        tier.close()
        client.close()
        raw.close()


# -- lookup -----------------------------------------------------------------------------


def _lookup_section(r: _Run) -> None:
    """Longest-prefix lookup of a long prompt with every chunk cached, vs one sha256 of its tokens."""
    c, ns = r.config, BENCH_NS
    tokens = np.random.default_rng(c.seed + 1).integers(0, 128256, c.prompt_tokens, dtype=np.uint32)
    keys = prefix_keys(ns, tokens)
    store = TieredStore([CPUTier(CPUTierConfig(capacity_bytes=(len(keys) + 1) * 4096))])
    try:
        store.register_namespace(ns)
        tiny = np.zeros(TINY_CHUNK, dtype=np.uint8)
        for key in keys:
            _check(store.put(ns, key, tiny), "lookup fill put")
        leases: list[int] = []

        def lookup(i: int) -> None:
            res = store.lookup(ns, tokens)
            _expect(res.hit_chunks, len(keys), "lookup hits")
            leases.append(res.lease or 0)

        def lookup_nolease(i: int) -> None:
            _expect(store.lookup(ns, tokens, lease=False).hit_chunks, len(keys), "lookup hits")

        t = r.time(
            {
                "sha256": Case(lambda i: hashlib.sha256(tokens.tobytes()).digest()),
                "lookup": Case(lookup, teardown=lambda i: store.release(leases.pop())),
                "lookup_nolease": Case(lookup_nolease),
                "prefix_keys": Case(lambda i: prefix_keys(ns, tokens)),
                "index_probes": Case(lambda i: store.index.longest_prefix(keys)),
            },
            iters=max(20, 3 * c.iters),
        )
    finally:
        store.close()
    r.report.record("lookup_tokens", c.prompt_tokens)
    r.report.record("lookup_chunks", len(keys))
    for label, ratio_key, ours in (
        (f"prefix lookup, {c.prompt_tokens} tokens", "lookup_vs_sha256", "lookup"),
        ("  same, lease=False", "lookup_nolease_vs_sha256", "lookup_nolease"),
        (f"  hashing alone ({len(keys)} prefix keys)", "prefix_keys_vs_sha256", "prefix_keys"),
        (f"  index probes alone ({len(keys)} keys)", "index_probes_vs_sha256", "index_probes"),
    ):
        r.report.compare_times(label, ratio_key, t, ours, "sha256")


# -- memory -----------------------------------------------------------------------------


def _memory_section(r: _Run) -> None:
    """Traced bytes per entry of the prefix index and of the CPU tier's metadata."""
    c = r.config
    index = _index_bytes(c.index_entries) / c.index_entries
    meta = _cpu_meta_bytes(c.meta_entries) / c.meta_entries
    r.report.record("index_entries", c.index_entries)
    r.report.absolute(f"prefix index, {c.index_entries:,} entries", "index_bytes_per_chunk", index, "B/chunk")
    r.report.record("cpu_tier_meta_entries", c.meta_entries)
    label = f"CPU tier metadata, {c.meta_entries:,} entries"
    r.report.absolute(label, "cpu_tier_meta_bytes_per_chunk", meta, "B/chunk")
    r.report.note("index bytes include the 32-byte key objects; CPU tier metadata excludes them (shared)")


def _index_bytes(n: int) -> int:
    raw = os.urandom(32 * n)  # key material, allocated before tracing starts

    def fill() -> PrefixIndex:
        index = PrefixIndex()
        for i in range(n):  # the key objects are made here: their bytes count
            index.add(ChunkKey(raw[32 * i : 32 * i + 32]), 0)
        return index

    return traced_bytes(fill)


def _cpu_meta_bytes(n: int) -> int:
    raw = os.urandom(32 * n)
    keys = [ChunkKey(raw[32 * i : 32 * i + 32]) for i in range(n)]  # untraced: the index owns the keys
    tier = CPUTier(CPUTierConfig(n * TINY_CHUNK, alignment=TINY_CHUNK, prefault=False, pin_memory="never"))
    tiny = np.zeros(TINY_CHUNK, dtype=np.uint8)
    meta = ChunkMeta(BENCH_NS.id, TINY_CHUNK, b"")

    def fill() -> CPUTier:
        for key in keys:
            _check(tier.put(key, tiny, meta), "CPU tier metadata put")
        return tier

    try:
        return traced_bytes(fill)
    finally:
        tier.close()


_SECTIONS: dict[str, Callable[[_Run], None]] = {
    "cpu": _cpu_section,
    "disk": _disk_section,
    "redis": _redis_section,
    "lookup": _lookup_section,
    "memory": _memory_section,
}


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(f"{what} was refused: the benchmark would time a no-op")


def _expect(got: int | None, want: int, what: str) -> None:
    if got != want:
        raise RuntimeError(f"{what}: got {got}, expected {want}")


def main(argv: list[str] | None = None) -> int:
    """``python -m kvstore.benchmarks.store [flags]``: the same as ``kvstore bench store``."""
    parser = argparse.ArgumentParser(prog="kvstore bench store", description=(__doc__ or "").split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
