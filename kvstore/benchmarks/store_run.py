"""One run of the storage benchmark: its config, its chunks and report, and what the sections share."""

from __future__ import annotations

import argparse
import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kvstore.benchmarks.common import Case, Report, Timing, measure_interleaved, quick_default
from kvstore.buffers import U8
from kvstore.checksum import checksum
from kvstore.keys import ChunkKey, Namespace
from kvstore.spec import KVSpec, ModelFingerprint
from kvstore.tiers.base import ChunkMeta

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


class Run:
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


def bench_key(tag: str, i: int) -> ChunkKey:
    """A distinct 32-byte key per (tag, i): fresh keys make every put really copy."""
    return ChunkKey(hashlib.sha256(f"kvstore-bench/{tag}/{i}".encode()).digest())


class ByteTier(Protocol):
    """What the disk and Redis sections use of a tier: the Tier ABC's byte operations."""

    def put(self, key: ChunkKey, data: U8, meta: ChunkMeta) -> bool: ...
    def get_into(self, key: ChunkKey, out: U8) -> int | None: ...
    def delete(self, key: ChunkKey) -> bool: ...


def tier_cases(r: Run, tier: ByteTier, tag: str, gets: bool = True) -> dict[str, Case]:
    """``<tag>_put`` of a fresh key (deleted untimed after); ``<tag>_get`` of a stored chunk into r.out."""

    def put(i: int) -> None:
        check(tier.put(bench_key(tag, i), r.chunk(i), r.meta(i)), f"{tag} put")

    def get(i: int) -> None:
        expect(tier.get_into(bench_key(tag + "-get", i % r.n), r.out), r.nbytes, f"{tag} get")

    for i in r.ids if gets else ():
        check(tier.put(bench_key(tag + "-get", i), r.data[i], r.meta(i)), f"{tag} put")
    cases = {f"{tag}_put": Case(put, teardown=lambda i: tier.delete(bench_key(tag, i)))}
    return {**cases, f"{tag}_get": Case(get)} if gets else cases


def check(ok: bool, what: str) -> None:
    """Raise unless a put (or another step a timing relies on) succeeded."""
    if not ok:
        raise RuntimeError(f"{what} was refused: the benchmark would time a no-op")


def expect(got: int | None, want: int, what: str) -> None:
    """Raise unless a timed step returned what it should (a miss would time a no-op)."""
    if got != want:
        raise RuntimeError(f"{what}: got {got}, expected {want}")
