"""The extent allocator and the eviction policies."""

from __future__ import annotations

import random

import pytest

from kvstore.errors import InvalidInput, UnknownName
from kvstore.keys import ChunkKey
from kvstore.tiers.arena import Extent, ExtentAllocator
from kvstore.tiers.policies import make_policy, policy_names


def k(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(32, "big"))


def test_allocator_best_fit_split_and_coalesce() -> None:
    a = ExtentAllocator(64 * 1024, alignment=4096)
    xs = [a.allocate(4096) for _ in range(16)]
    assert all(x is not None for x in xs) and a.free_bytes == 0
    assert a.allocate(1) is None
    for x in xs[2:5]:  # a 3-unit hole
        a.free(x)  # type: ignore[arg-type]
    a.free(xs[10])  # type: ignore[arg-type]  # a 1-unit hole
    got = a.allocate(100)
    assert got == xs[10]  # best fit picks the 1-unit hole, not the 3-unit one
    assert a.free_extents() == [Extent(2 * 4096, 3 * 4096)]
    for x in xs[:2] + xs[5:10] + xs[11:] + [got]:
        a.free(x)  # type: ignore[arg-type]
    assert a.free_extents() == [Extent(0, 64 * 1024)]  # everything merged back


def test_allocator_random_churn_keeps_invariants() -> None:
    rng = random.Random(7)
    a = ExtentAllocator(1 << 20, alignment=256)
    live: list[Extent] = []
    for _ in range(3000):
        if live and rng.random() < 0.45:
            a.free(live.pop(rng.randrange(len(live))))
        else:
            x = a.allocate(rng.randint(1, 40000))
            if x is not None:
                live.append(x)
        free = a.free_extents()
        assert a.free_bytes + sum(x.size for x in live) == a.capacity
        for f1, f2 in zip(free, free[1:]):
            assert f1.offset + f1.size < f2.offset  # never overlapping nor touching
        spans = sorted([(x.offset, x.offset + x.size) for x in live] + [(f.offset, f.offset + f.size) for f in free])
        for (s1, e1), (s2, _) in zip(spans, spans[1:]):
            assert e1 == s2  # allocated + free tile the arena exactly


def test_allocator_refuses_double_free_and_bad_alignment() -> None:
    a = ExtentAllocator(8192, alignment=4096)
    x = a.allocate(10)
    assert x is not None
    a.free(x)
    with pytest.raises(InvalidInput):
        a.free(x)
    with pytest.raises(InvalidInput):
        ExtentAllocator(8192, alignment=3000)


def test_lru_order() -> None:
    p = make_policy("lru")
    for i in range(3):
        p.admit(k(i), 10, 1.0, 0.0)
    p.touch(k(0), 1.0)
    assert p.victim(lambda key: False, 2.0) == k(1)
    assert p.victim(lambda key: key == k(1), 2.0) == k(2)


def test_lfu_order() -> None:
    p = make_policy("lfu")
    for i in range(3):
        p.admit(k(i), 10, 1.0, 0.0)
    for _ in range(3):
        p.touch(k(0), 1.0)
    p.touch(k(1), 1.0)
    assert p.victim(lambda key: False, 2.0) == k(2)
    p.remove(k(2))
    assert p.victim(lambda key: False, 2.0) == k(1)
    assert p.victim(lambda key: key == k(1), 2.0) == k(0)


def test_cost_aware_keeps_expensive_chunks() -> None:
    p = make_policy("cost")
    p.admit(k(0), 10, 5.0, 0.0)  # expensive to recompute
    p.admit(k(1), 10, 1.0, 0.0)
    p.admit(k(2), 10, 2.0, 0.0)
    assert p.victim(lambda key: False, 0.0) == k(1)
    p.remove(k(1))
    assert p.victim(lambda key: False, 0.0) == k(2)
    assert p.victim(lambda key: key == k(2), 0.0) == k(0)  # pinned ones are skipped, not lost
    assert p.victim(lambda key: False, 0.0) == k(2)
    with pytest.raises(InvalidInput):
        p.admit(k(3), 1, -1.0, 0.0)


def test_ttl_expiry() -> None:
    p = make_policy("ttl", ttl_s=10.0)
    p.admit(k(0), 1, 1.0, 0.0)
    p.admit(k(1), 1, 1.0, 5.0)
    assert p.expired(9.0) == []
    assert p.expired(10.0) == [k(0)]
    assert p.expired(15.0) == [k(0), k(1)]


def test_registry() -> None:
    assert policy_names() == ["cost", "lfu", "lru", "ttl"]
    with pytest.raises(UnknownName):
        make_policy("fifo")
