"""The CPU tier: budget, eviction, pins, checksums, TTL, bad input."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from kvstore.checksum import checksum
from kvstore.errors import InvalidInput, LeaseError
from kvstore.keys import ChunkKey, NamespaceId
from kvstore.tiers.base import ChunkMeta
from kvstore.tiers.cpu import CPUTier, CPUTierConfig

NS = NamespaceId(b"n" * 32)
NS2 = NamespaceId(b"m" * 32)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def k(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(32, "big"))


def meta(ns: NamespaceId = NS) -> ChunkMeta:
    return ChunkMeta(ns, 0, b"")


def data(i: int, n: int = 5000) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8)


def tier(cap: int = 64 * 1024, **kw: object) -> CPUTier:
    return CPUTier(CPUTierConfig(capacity_bytes=cap, alignment=4096, **kw))  # type: ignore[arg-type]


def test_checksum_on_put_or_lazily_once() -> None:
    d = data(1)
    eager = tier(checksum="on_put")
    assert eager.put(k(1), d, meta())
    m = eager.meta(k(1))
    assert m is not None and m.checksum == checksum(d)
    lazy = tier()
    assert lazy.put(k(1), d, meta())
    m = lazy.meta(k(1))
    assert m is not None and m.checksum == b""  # not computed on the put path
    assert lazy.checksum(k(1)) == checksum(d) and lazy.pinned_count() == 0
    m = lazy.meta(k(1))
    assert m is not None and m.checksum == checksum(d)  # computed once, kept
    assert lazy.checksum(k(2)) == b""


def test_round_trip() -> None:
    t = tier()
    d = data(1)
    assert t.put(k(1), d, meta())
    m = t.meta(k(1))
    assert m is not None and m.nbytes == d.size
    out = np.zeros(8192, dtype=np.uint8)
    assert t.get_into(k(1), out) == d.size
    assert np.array_equal(out[: d.size], d)
    got = t.read(k(1))
    assert got is not None and np.array_equal(got[0], d)
    s = t.stats()
    assert (s.hits, s.entries, s.used_bytes) == (2, 1, 8192)


def test_torch_tensor_in_and_out() -> None:
    t = tier()
    src = torch.randn(2, 2, 16, 4).to(torch.bfloat16)
    u8 = src.reshape(-1).view(torch.uint8).numpy()
    assert t.put(k(1), u8, meta())
    dst = torch.empty_like(src)
    assert t.get_into(k(1), dst.reshape(-1).view(torch.uint8).numpy()) == src.numel() * 2
    assert torch.equal(dst, src)


def test_budget_holds_and_lru_evicts_oldest() -> None:
    t = tier(cap=4 * 8192)
    for i in range(4):
        assert t.put(k(i), data(i), meta())
    out = np.zeros(5000, dtype=np.uint8)
    t.get_into(k(0), out)  # k(0) becomes most recent
    assert t.put(k(9), data(9), meta())
    s = t.stats()
    assert s.used_bytes <= s.capacity_bytes and s.evictions == 1
    assert t.contains(k(0)) and not t.contains(k(1))
    assert t.get_into(k(1), out) is None
    assert t.stats().misses["evicted"] == 1
    assert t.get_into(k(77), out) is None
    assert t.stats().misses["absent"] == 1


def test_pinned_chunks_are_never_evicted() -> None:
    t = tier(cap=2 * 8192)
    t.put(k(0), data(0), meta())
    t.put(k(1), data(1), meta())
    assert t.pin(k(0)) and t.pin(k(1))
    assert not t.put(k(2), data(2), meta())  # everything pinned: rejected, counted
    assert t.stats().rejected == 1
    t.unpin(k(1))
    assert t.put(k(2), data(2), meta())
    assert t.contains(k(0)) and not t.contains(k(1))
    t.unpin(k(0))
    with pytest.raises(LeaseError):
        t.unpin(k(0))  # a count never goes below zero
    assert t.pinned_count() == 0


def test_delete_of_a_pinned_chunk_frees_it_at_the_last_unpin() -> None:
    t = tier()
    t.put(k(0), data(0), meta())
    t.pin(k(0))
    assert t.delete(k(0))
    assert not t.contains(k(0)) and t.stats().used_bytes == 8192  # still held by the pin
    t.unpin(k(0))
    assert t.stats().used_bytes == 0 and t.stats().entries == 0


def test_ttl_policy_expires_chunks() -> None:
    clock = Clock()
    t = CPUTier(CPUTierConfig(capacity_bytes=65536, policy="ttl", ttl_s=5.0), clock=clock)
    t.put(k(0), data(0), meta())
    clock.t = 4.9
    assert t.contains(k(0))
    clock.t = 5.0
    out = np.zeros(5000, dtype=np.uint8)
    assert t.get_into(k(0), out) is None
    assert t.stats().misses["expired"] == 1 and t.stats().used_bytes == 0


def test_small_output_buffer_is_a_counted_miss() -> None:
    t = tier()
    t.put(k(0), data(0), meta())
    assert t.get_into(k(0), np.zeros(10, dtype=np.uint8)) is None
    assert t.stats().misses["too_small"] == 1


def test_namespace_listing_and_clear() -> None:
    t = tier()
    t.put(k(0), data(0, 100), meta(NS))
    t.put(k(1), data(1, 100), meta(NS2))
    assert list(t.keys(NS)) == [k(0)]
    assert t.clear(NS2) == 1
    assert list(t.keys()) == [k(0)]


def test_oversized_and_bad_config() -> None:
    t = tier(cap=16384, max_chunk_bytes=8192)
    with pytest.raises(InvalidInput):
        t.put(k(0), data(0, 9000), meta())
    for bad in (
        dict(capacity_bytes=0),
        dict(capacity_bytes=10, policy="nope"),
        dict(capacity_bytes=10, pin_memory="sometimes"),
        dict(capacity_bytes=10, max_chunk_bytes=20),
        dict(capacity_bytes=10, ttl_s=0.0),
        dict(capacity_bytes=10, checksum="sometimes"),
    ):
        with pytest.raises(ValueError):
            CPUTierConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CPUTier(CPUTierConfig(capacity_bytes=100, pin_memory="always"))  # no CUDA here


def test_concurrent_puts_and_gets_stay_consistent() -> None:
    t = tier(cap=32 * 8192)
    errors: list[str] = []

    def worker(w: int) -> None:
        out = np.zeros(5000, dtype=np.uint8)
        for i in range(200):
            key = w * 1000 + i % 40
            t.put(k(key), data(key), meta())
            n = t.get_into(k(key), out)
            if n is not None and not np.array_equal(out[:n], data(key)):
                errors.append(f"wrong bytes for {key}")

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    s = t.stats()
    assert s.used_bytes <= s.capacity_bytes and t.pinned_count() == 0
    assert s.used_bytes == s.entries * 8192


def test_reserve_commit_abort_keep_the_budget() -> None:
    t = tier(cap=4 * 8192)
    ext = t.reserve(5000)
    assert ext is not None and t.stats().used_bytes == 8192
    assert not t.contains(k(1))  # invisible until committed
    t.region(ext)[:5000] = data(1)
    assert t.commit(k(1), ext, ChunkMeta(NS, 5000, checksum(data(1))))
    out = np.zeros(5000, dtype=np.uint8)
    assert t.get_into(k(1), out) == 5000 and np.array_equal(out, data(1))
    other = t.reserve(5000)
    assert other is not None
    t.abort(other)
    assert t.stats().used_bytes == 8192 and t.stats().entries == 1
    dup = t.reserve(100)
    assert dup is not None and t.commit(k(1), dup, ChunkMeta(NS, 100, b""))  # already there: kept
    assert t.stats().used_bytes == 8192
    with pytest.raises(InvalidInput):
        t.reserve(10**9)


def test_shared_memory_arena_is_read_by_another_process() -> None:
    import os
    import subprocess
    import sys

    t = CPUTier(CPUTierConfig(capacity_bytes=1 << 20, shared_memory=True))
    try:
        assert t.shm_path is not None and os.stat(t.shm_path).st_mode & 0o777 == 0o600
        d = data(3)
        t.put(k(3), d, meta())
        loc = t.locate(k(3))  # pinned while the other process reads
        assert loc is not None and loc.size == d.size
        code = (
            "import mmap, os, sys, hashlib\n"
            f"fd = os.open({t.shm_path!r}, os.O_RDONLY)\n"
            "m = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)\n"
            f"print(hashlib.sha256(m[{loc.offset}:{loc.offset + loc.size}]).hexdigest())\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        import hashlib

        assert out.stdout.strip() == hashlib.sha256(d.tobytes()).hexdigest()
        t.unpin(k(3))
        assert t.pinned_count() == 0
    finally:
        path = t.shm_path
        t.close()
    assert path is not None and not os.path.exists(path)
