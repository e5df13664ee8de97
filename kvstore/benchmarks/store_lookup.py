"""The lookup and memory sections of the storage benchmark: prefix lookup vs sha256, bytes per entry."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import numpy as np

from kvstore.benchmarks.baselines import traced_bytes
from kvstore.benchmarks.common import Case, Timing
from kvstore.benchmarks.store_run import BENCH_NS, TINY_CHUNK, Run, check, expect
from kvstore.index.prefix import PrefixIndex
from kvstore.keys import ChunkKey, prefix_keys
from kvstore.tiers.base import ChunkMeta
from kvstore.tiers.cpu import CPUTier, CPUTierConfig
from kvstore.tiers.store import TieredStore

# -- lookup -----------------------------------------------------------------------------


def lookup_section(r: Run) -> None:
    """Longest-prefix lookup of a long prompt with every chunk cached, vs one sha256 of its tokens."""
    c, ns = r.config, BENCH_NS
    tokens = np.random.default_rng(c.seed + 1).integers(0, 128256, c.prompt_tokens, dtype=np.uint32)
    keys = prefix_keys(ns, tokens)
    store = TieredStore([CPUTier(CPUTierConfig(capacity_bytes=(len(keys) + 1) * 4096))])
    try:
        store.register_namespace(ns)
        tiny = np.zeros(TINY_CHUNK, dtype=np.uint8)
        for key in keys:
            check(store.put(ns, key, tiny), "lookup fill put")
        leases: list[int] = []

        def lookup(i: int) -> None:
            res = store.lookup(ns, tokens)
            expect(res.hit_chunks, len(keys), "lookup hits")
            leases.append(res.lease or 0)

        def lookup_nolease(i: int) -> None:
            expect(store.lookup(ns, tokens, lease=False).hit_chunks, len(keys), "lookup hits")

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
    _report_lookup(r, t, len(keys))


def _report_lookup(r: Run, t: Mapping[str, Timing], chunks: int) -> None:
    """The lookup figures, each against one sha256 of the prompt's tokens."""
    c = r.config
    r.report.record("lookup_tokens", c.prompt_tokens)
    r.report.record("lookup_chunks", chunks)
    for label, ratio_key, ours in (
        (f"prefix lookup, {c.prompt_tokens} tokens", "lookup_vs_sha256", "lookup"),
        ("  same, lease=False", "lookup_nolease_vs_sha256", "lookup_nolease"),
        (f"  hashing alone ({chunks} prefix keys)", "prefix_keys_vs_sha256", "prefix_keys"),
        (f"  index probes alone ({chunks} keys)", "index_probes_vs_sha256", "index_probes"),
    ):
        r.report.compare_times(label, ratio_key, t, ours, "sha256")


# -- memory -----------------------------------------------------------------------------


def memory_section(r: Run) -> None:
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
            check(tier.put(key, tiny, meta), "CPU tier metadata put")
        return tier

    try:
        return traced_bytes(fill)
    finally:
        tier.close()
