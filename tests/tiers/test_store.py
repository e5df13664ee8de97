"""The tiered store: puts, lookups with leases, gets, promotion, demotion, errors."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from kvstore.errors import ChunkTooLarge, DTypeMismatch, InvalidInput, ShapeMismatch, UnknownNamespace
from kvstore.events import EventQueue
from kvstore.keys import ChunkKey, Namespace, content_key, prefix_keys
from kvstore.spec import KVSpec, ModelFingerprint
from kvstore.tiers.cpu import CPUTier, CPUTierConfig
from kvstore.tiers.store import StoreConfig, TieredStore

SPEC = KVSpec(ModelFingerprint("m"), 2, 2, 8, "float16")
NS = Namespace("tenant-a", SPEC, chunk_tokens=16)
CHUNK = SPEC.chunk_nbytes(16)  # 2048 bytes


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def chunk(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(SPEC.chunk_shape(16), generator=g).half()


def make(
    top_chunks: int = 8, low_chunks: int | None = 32, clock: Clock | None = None, **cfg: object
) -> TieredStore:
    tiers = [CPUTier(CPUTierConfig(capacity_bytes=top_chunks * CHUNK, alignment=256), "top")]
    if low_chunks:
        tiers.append(CPUTier(CPUTierConfig(capacity_bytes=low_chunks * CHUNK, alignment=256), "low"))
    store = TieredStore(tiers, StoreConfig(**cfg), clock=clock or time.monotonic)  # type: ignore[arg-type]
    store.register_namespace(NS)
    return store


def tokens(n_chunks: int, seed: int = 0) -> list[int]:
    return [seed * 100000 + i for i in range(n_chunks * 16 + 5)]  # + a partial tail


def test_put_prefix_lookup_get_round_trip() -> None:
    with make() as st:
        toks = tokens(4)
        chunks = [chunk(i) for i in range(4)]
        assert st.put_prefix(NS, toks, chunks) == 4
        assert st.put_prefix(NS, toks, chunks) == 0  # already present: skipped
        r = st.lookup(NS, toks)
        assert (r.hit_tokens, r.hit_chunks, r.query_chunks) == (64, 4, 4)
        assert r.tiers == ("top",) * 4 and r.lease is not None
        out = torch.empty(SPEC.chunk_shape(16), dtype=torch.float16)
        for key, expected in zip(r.keys, chunks):
            assert st.get(NS, key, out, r.lease) == CHUNK
            assert torch.equal(out, expected)
        assert st.stats().leases.active == 0  # the gets consumed the lease
        st.flush()  # queued write-through jobs hold their own pins until written
        assert st.top.pinned_count() == 0


def test_lookup_stops_at_first_missing_chunk() -> None:
    with make() as st:
        toks = tokens(4)
        keys = prefix_keys(NS, toks)
        st.put(NS, keys[0], chunk(0))
        st.put(NS, keys[2], chunk(2))  # a hole at chunk 1
        r = st.lookup(NS, toks, lease=False)
        assert r.hit_chunks == 1 and r.lease is None
        other = st.lookup(NS, tokens(4, seed=1))
        assert other.hit_tokens == 0 and other.lease is None


def test_write_through_fills_lower_tier_and_promotes_on_hit() -> None:
    with make(top_chunks=2) as st:
        toks = tokens(6)
        chunks = [chunk(i) for i in range(6)]
        st.put_prefix(NS, toks, chunks)
        st.flush()
        low = st.tiers[1]
        assert len(list(low.keys())) == 6
        assert len(list(st.top.keys())) == 2  # the top tier evicted the oldest four
        r = st.lookup(NS, toks)
        assert r.hit_chunks == 6 and r.tiers[:4] == ("low",) * 4 and r.tiers[4:] == ("top",) * 2
        out = torch.empty(SPEC.chunk_shape(16), dtype=torch.float16)
        assert st.get(NS, r.keys[0], out, r.lease) == CHUNK and torch.equal(out, chunks[0])
        # the top tier is full of chunks this lease pins: no room to promote
        assert not st.top.contains(r.keys[0]) and st.stats().promotions == 0
        st.release(r.lease)  # type: ignore[arg-type]
        assert st.top.pinned_count() == 0 and low.pinned_count() == 0  # type: ignore[attr-defined]
        assert st.get(NS, r.keys[1], out) == CHUNK and torch.equal(out, chunks[1])
        assert st.top.contains(r.keys[1]) and st.stats().promotions == 1


def test_write_back_demotes_only_on_eviction() -> None:
    with make(top_chunks=2, write_mode="write_back") as st:
        keys = prefix_keys(NS, tokens(3))
        for i, key in enumerate(keys):
            st.put(NS, key, chunk(i))
        st.flush()
        low = st.tiers[1]
        assert list(low.keys()) == [keys[0]]  # only the evicted chunk went down
        out = torch.empty(SPEC.chunk_shape(16), dtype=torch.float16)
        assert st.get(NS, keys[0], out) == CHUNK and torch.equal(out, chunk(0))


def test_expired_lease_releases_its_pins() -> None:
    clock = Clock()
    with make(clock=clock, lease_ttl_s=5.0) as st:
        toks = tokens(2)
        st.put_prefix(NS, toks, [chunk(0), chunk(1)])
        st.flush()  # background writes hold pins until done
        r = st.lookup(NS, toks)
        assert st.top.pinned_count() == 2
        clock.t = 5.0
        deadline = time.monotonic() + 5
        while st.top.pinned_count() and time.monotonic() < deadline:
            time.sleep(0.05)  # the reaper thread expires it without any call
        assert st.top.pinned_count() == 0
        s = st.stats().leases
        assert (s.active, s.expired) == (0, 1)
        assert st.release(r.lease) is False  # releasing an expired lease is harmless
        out = torch.empty(SPEC.chunk_shape(16), dtype=torch.float16)
        assert st.get(NS, r.keys[0], out, r.lease) == CHUNK  # falls back to an unpinned read


def test_release_twice_is_harmless_and_pins_protect_from_eviction() -> None:
    with make(top_chunks=2, low_chunks=None) as st:
        toks = tokens(2)
        st.put_prefix(NS, toks, [chunk(0), chunk(1)])
        r = st.lookup(NS, toks)
        assert r.lease is not None
        assert not st.put(NS, prefix_keys(NS, tokens(1, seed=5))[0], chunk(5))  # all pinned
        assert st.release(r.lease) and not st.release(r.lease)
        assert st.put(NS, prefix_keys(NS, tokens(1, seed=5))[0], chunk(5))


def test_chunk_cache_round_trip_at_any_position() -> None:
    with make() as st:
        passage = list(range(500, 523))  # 23 tokens, not chunk aligned
        kv = torch.randn(SPEC.chunk_shape(23)).half()
        key = st.put_chunk_cache(NS, passage, kv, start_position=100)
        assert key == content_key(NS, passage)
        hits = st.lookup_chunk_caches(NS, [passage, [1, 2, 3]])
        assert hits[0] is not None and hits[0].start_position == 100 and hits[0].num_tokens == 23
        assert hits[1] is None
        out = torch.empty_like(kv)
        assert st.get(NS, key, out) == kv.numel() * 2 and torch.equal(out, kv)
        st.delete(NS, key)
        assert st.lookup_chunk_caches(NS, [passage]) == [None]


def test_events_follow_what_can_be_fetched() -> None:
    events = EventQueue()
    tiers = [CPUTier(CPUTierConfig(capacity_bytes=CHUNK, alignment=256), "top")]
    with TieredStore(tiers, events=events) as st:
        st.register_namespace(NS)
        keys = prefix_keys(NS, tokens(2))
        st.put(NS, keys[0], chunk(0))
        st.put(NS, keys[1], chunk(1))  # evicts keys[0]
        got = [(e.kind, e.key) for e in events.drain()]
        assert got == [("stored", keys[0]), ("removed", keys[0]), ("stored", keys[1])]
        st.clear(NS)
        assert [e.kind for e in events.drain()] == ["removed", "cleared"] or [
            e.kind for e in events.drain()
        ] == []


def test_delete_and_clear_are_namespace_scoped() -> None:
    other = Namespace("tenant-b", SPEC, chunk_tokens=16)
    with make() as st:
        st.register_namespace(other)
        st.put_prefix(NS, tokens(2), [chunk(0), chunk(1)])
        st.put_prefix(other, tokens(2), [chunk(2), chunk(3)])
        st.flush()
        assert st.lookup(other, tokens(2), lease=False).hit_chunks == 2
        assert st.clear(NS) == 4  # 2 chunks x 2 tiers
        assert st.lookup(NS, tokens(2), lease=False).hit_chunks == 0
        assert st.lookup(other, tokens(2), lease=False).hit_chunks == 2
        key = prefix_keys(other, tokens(2))[0]
        assert st.delete(other, key) and not st.delete(other, key)


def test_bad_input_gets_clear_errors_and_loses_nothing() -> None:
    with make() as st:
        key = prefix_keys(NS, tokens(1))[0]
        st.put(NS, key, chunk(0))
        with pytest.raises(UnknownNamespace):
            st.put(Namespace("ghost", SPEC, chunk_tokens=16), key, chunk(0))
        with pytest.raises(UnknownNamespace):
            st.lookup(Namespace("ghost", SPEC, chunk_tokens=16), tokens(1))
        with pytest.raises(ShapeMismatch):
            st.put(NS, key, torch.zeros(2, 2, 15, 2, 8, dtype=torch.float16))
        with pytest.raises(DTypeMismatch):
            st.put(NS, key, torch.zeros(SPEC.chunk_shape(16), dtype=torch.bfloat16))
        with pytest.raises(ShapeMismatch):
            st.put_prefix(NS, tokens(1), [b"\x00" * 100])
        with pytest.raises(InvalidInput):
            st.put_prefix(NS, tokens(1), [chunk(0), chunk(1)])  # more chunks than tokens hold
        with pytest.raises(InvalidInput):
            st.put(NS, ChunkKey(b"short"), chunk(0))
        with pytest.raises(ChunkTooLarge):
            st.put(NS, key, np.zeros(9 * CHUNK, dtype=np.uint8))  # larger than the top tier
        with pytest.raises(InvalidInput):
            st.get(NS, key, bytes(CHUNK))  # read-only output buffer
        with pytest.raises(ValueError):
            StoreConfig(write_mode="sometimes")  # type: ignore[arg-type]
        out = torch.empty(SPEC.chunk_shape(16), dtype=torch.float16)
        assert st.get(NS, key, out) == CHUNK and torch.equal(out, chunk(0))  # nothing was lost


def test_a_tenant_cannot_read_delete_pin_or_probe_another_tenants_chunks() -> None:
    other = Namespace("tenant-b", SPEC, chunk_tokens=16)
    with make() as st:
        st.register_namespace(other)
        keys = prefix_keys(NS, tokens(2))
        st.put_prefix(NS, tokens(2), [chunk(0), chunk(1)])
        st.flush()
        out = torch.zeros(SPEC.chunk_shape(16), dtype=torch.float16)
        assert st.get(other, keys[0], out) is None  # the key is known, the namespace is not its
        assert not out.any()  # nothing was copied
        assert st.lookup_keys(other, keys).hit_chunks == 0
        assert st.pin(other, keys) is None
        assert not st.delete(other, keys[0])
        assert not st.put(other, keys[0], chunk(9))  # cannot overwrite or share the key
        assert st.get(NS, keys[0], out) == CHUNK and torch.equal(out, chunk(0))  # the owner still has it
        assert st.lookup_keys(NS, keys).hit_chunks == 2
