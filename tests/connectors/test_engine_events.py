"""Store events as vLLM KV events: they match what the store really holds, in vLLM's wire shape."""

from __future__ import annotations

import itertools

import msgpack
import numpy as np
import pytest

from kvstore.builder import TiersConfig, build_tiers
from kvstore.connectors.vllm import KVStoreConnector
from kvstore.connectors.vllm_backend import LocalBackend
from kvstore.connectors.vllm_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventFanout,
    VLLMEventStream,
    convert,
    decode_batch,
    encode_batch,
)
from kvstore.events import EventQueue, StoreEvent
from kvstore.keys import ChunkKey, Namespace, NamespaceId
from kvstore.spec import KVSpec, ModelFingerprint
from kvstore.tiers.store import TieredStore
from kvstore.tiers.store_types import StoreConfig
from tests.connectors.test_vllm_fakes import FakeEngine, FakeRequest, make_config

BS, C = 4, 8
SPEC = KVSpec(ModelFingerprint("m"), num_layers=1, num_kv_heads=1, head_dim=4, dtype="float16")
NS_A = Namespace("a", SPEC, chunk_tokens=16)
NS_B = Namespace("b", SPEC, chunk_tokens=16)


def key(i: int) -> ChunkKey:
    return ChunkKey(bytes([i]) * 32)


def sizes(ns_id: NamespaceId) -> int | None:
    return {NS_A.id: 16, NS_B.id: 16}.get(ns_id)


def test_convert_orders_filters_and_cancels() -> None:
    evs = [
        StoreEvent("stored", "cpu", NS_A.id, key(1)),
        StoreEvent("stored", "cpu", NS_B.id, key(2)),  # another tenant: filtered out
        StoreEvent("stored", "cpu", NS_A.id, key(3)),
        StoreEvent("stored", "disk", NS_A.id, key(3)),
        StoreEvent("removed", "cpu", NS_A.id, key(3)),  # stored and dropped in this batch: neither is announced
        StoreEvent("removed", "cpu", NS_A.id, key(7)),
        StoreEvent("removed", "cpu", NS_A.id, key(8)),
        StoreEvent("removed", "disk", NS_A.id, key(9)),
        StoreEvent("cleared", "cpu", NS_A.id),
        StoreEvent("cleared", "disk", NS_A.id),
        StoreEvent("cleared", "cpu", NS_B.id),
    ]
    got = convert(evs, sizes, {NS_A.id})
    assert got == [
        BlockStored((key(1),), None, (), 16, None, "cpu", None),
        BlockStored((key(3),), None, (), 16, None, "disk", None),
        BlockRemoved((key(7), key(8)), "cpu"),
        BlockRemoved((key(9),), "disk"),
        AllBlocksCleared(),
    ]
    assert len(convert(evs, sizes)) == 6  # unfiltered: tenant b's store too; the three clears merge into one


def test_wire_shape_is_vllms() -> None:
    events = [
        BlockStored((key(1),), None, (), 16, None, "cpu", None),
        BlockRemoved((key(1), key(2)), "cpu"),
        AllBlocksCleared(),
    ]
    payload = encode_batch(events, ts=12.5)
    raw = msgpack.unpackb(payload, raw=False)
    assert raw[0] == 12.5 and len(raw) == 3 and raw[2] is None  # array-like batch; no data-parallel rank
    stored, removed, cleared = raw[1]
    assert list(stored) == ["type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                            "medium", "lora_name"]  # tag first, required fields in order, unset optionals omitted
    assert stored["type"] == "BlockStored" and stored["block_hashes"] == [key(1)] and stored["medium"] == "cpu"
    assert removed == {"type": "BlockRemoved", "block_hashes": [key(1), key(2)], "medium": "cpu"}
    assert cleared == {"type": "AllBlocksCleared"}
    assert decode_batch(payload) == (12.5, events, None)
    assert decode_batch(msgpack.packb([12.5, []])) == (12.5, [], None)  # a batch without the rank field
    assert msgpack.unpackb(encode_batch(events, 1.0, data_parallel_rank=3))[2] == 3
    with pytest.raises(ValueError):
        decode_batch(msgpack.packb({"not": "a batch"}))
    with pytest.raises(ValueError):
        decode_batch(msgpack.packb([1.0, [{"type": "Nope"}]]))


def test_events_match_stores_and_evictions() -> None:
    """A small CPU tier evicts: every event stream's net content equals what the store can serve."""
    chunk = 2 * 2 * C * 2 * 32 * 2  # layers x K/V x tokens x heads x dim x bf16 = 4 KiB, the tier's extent size
    queue = EventQueue()
    store = TieredStore(build_tiers(TiersConfig(cpu_bytes=4 * chunk)), StoreConfig(), events=queue)
    backend = LocalBackend(store, queue)
    eng = FakeEngine(KVStoreConnector, make_config({"chunk_tokens": C}, layers=2, head_dim=32), backend=backend)
    try:
        held: set[bytes] = set()
        seen_stored = 0
        for i in range(3):  # 3 prompts x 3 chunks into a tier of 4 chunks
            eng.run_prefill(FakeRequest(f"r{i}", [(i * 1000 + t) % 32000 for t in range(25)], BS))
            # take_events hands vLLM's own structs where vLLM is installed, these dataclasses elsewhere
            for ev in eng.scheduler.take_events():
                assert ev.medium == "cpu"
                if type(ev).__name__ == "BlockStored":
                    assert ev.block_size == C and len(ev.block_hashes) == 1
                    held.update(ev.block_hashes)
                    seen_stored += 1
                else:
                    assert type(ev).__name__ == "BlockRemoved" and set(ev.block_hashes) <= held
                    held.difference_update(ev.block_hashes)
        assert seen_stored == 9
        assert held == set(store.top.keys()) and len(held) == 4
        ns = next(iter(store.namespaces()))
        out = np.empty(chunk, dtype=np.uint8)
        for h in held:  # every advertised chunk can be fetched under its advertised key
            assert store.get(ns, ChunkKey(h), out) == chunk
        assert list(eng.scheduler.take_events()) == []  # drained
        store.clear(ns)
        assert [type(e).__name__ for e in eng.scheduler.take_events()] == ["AllBlocksCleared"]
    finally:
        eng.close()


def test_stream_numbers_batches_and_fans_out() -> None:
    fan = EventFanout()
    qa, qb = fan.subscribe(), fan.subscribe()
    ticks = itertools.count(100)
    stream_a = VLLMEventStream(qa, sizes, {NS_A.id}, topic="kv", clock=lambda: float(next(ticks)))
    stream_b = VLLMEventStream(qb, sizes, {NS_B.id})
    assert stream_a.poll() is None
    fan.emit(StoreEvent("stored", "cpu", NS_A.id, key(1)))
    fan.emit(StoreEvent("stored", "cpu", NS_B.id, key(2)))
    first = stream_a.poll()
    assert first is not None and first.seq == 0
    assert first.frames == (b"kv", (0).to_bytes(8, "big"), first.payload)
    assert decode_batch(first.payload) == (100.0, [BlockStored((key(1),), None, (), 16, None, "cpu", None)], None)
    fan.emit(StoreEvent("removed", "cpu", NS_A.id, key(1)))
    second = stream_a.poll()
    assert second is not None and second.seq == 1 and second.events == (BlockRemoved((key(1),), "cpu"),)
    got_b = stream_b.poll()
    assert got_b is not None and got_b.events == (BlockStored((key(2),), None, (), 16, None, "cpu", None),)
    fan.unsubscribe(qb)
    fan.emit(StoreEvent("stored", "cpu", NS_B.id, key(3)))
    assert stream_b.poll() is None
