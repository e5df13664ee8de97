"""The vLLM v1 connector against fake vLLM objects built to the pinned release's field names.

Scheduler side: matched tokens are the longest stored prefix in whole chunks,
never the whole prompt, and ``cache_salt`` isolates tenants. Worker side: KV
saved from real paged tensors and loaded into another engine's paged tensors
is bit-identical; a chunk that vanishes between lookup and load is reported
with exactly its blocks.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
from collections.abc import Iterator

import pytest
import torch

from kvstore.builder import TiersConfig, build_tiers
from kvstore.connectors.vllm import KVStoreConnector
from kvstore.connectors.vllm_backend import SHARED_STORES, LocalBackend
from kvstore.connectors.vllm_compat import KVConnectorRole
from kvstore.connectors.vllm_meta import KVStoreConnectorMetadata
from kvstore.connectors.vllm_spec import engine_geometry, namespace_for
from kvstore.errors import DTypeMismatch, InvalidInput, ShapeMismatch
from kvstore.events import EventQueue
from kvstore.keys import engine_prefix_keys
from kvstore.tiers.store import TieredStore
from kvstore.tiers.store_types import StoreConfig
from tests.connectors.test_vllm_fakes import (
    CachedRequestData,
    FakeEngine,
    FakeRequest,
    NewRequestData,
    SchedulerOutput,
    make_config,
    token_kv,
)

BS, C = 4, 8  # vLLM block size, kvstore chunk tokens
_ids = itertools.count()


@pytest.fixture
def store_id() -> Iterator[str]:
    """A fresh shared in-process store id; the test must leave no store open."""
    sid = f"test-{next(_ids)}"
    yield sid
    assert sid not in SHARED_STORES.open_ids()


def settings(store_id: str, **more: object) -> dict[str, object]:
    return {"backend": "local", "store_id": store_id, "chunk_tokens": C, "cpu_bytes": 1 << 20, **more}


def prompt(n: int, seed: int = 0) -> list[int]:
    return [(seed * 7919 + i * 31) % 32000 for i in range(n)]


def test_loaded_the_way_vllm_loads_it() -> None:
    mod = importlib.import_module("kvstore.connectors.vllm")  # kv_connector_module_path
    cls = mod.KVStoreConnector  # kv_connector
    assert cls is KVStoreConnector
    assert "kv_cache_config" in inspect.signature(cls.__init__).parameters  # vLLM refuses 2-argument connectors


def test_matched_tokens_are_whole_chunks_and_never_the_whole_prompt(store_id: str) -> None:
    a = FakeEngine(KVStoreConnector, make_config(settings(store_id)))
    b = FakeEngine(KVStoreConnector, make_config(settings(store_id)))
    try:
        p = prompt(24)
        r = a.run_prefill(FakeRequest("a", p, BS))
        assert r.external_tokens == 0
        # 24 tokens = 3 stored chunks, but vLLM must compute the last token itself
        assert b.scheduler.get_num_new_matched_tokens(FakeRequest("b1", p, BS), 0) == (16, False)
        assert b.scheduler.get_num_new_matched_tokens(FakeRequest("b2", p + [1], BS), 0) == (24, False)
        assert b.scheduler.get_num_new_matched_tokens(FakeRequest("b3", p[:20], BS), 0) == (16, False)
        assert b.scheduler.get_num_new_matched_tokens(FakeRequest("b4", p[:7], BS), 0) == (0, False)
        # beyond what vLLM already holds locally (a block-aligned local hit)
        assert b.scheduler.get_num_new_matched_tokens(FakeRequest("b5", p + [1], BS), 12) == (12, False)
        assert b.scheduler.get_num_new_matched_tokens(FakeRequest("b6", p + [1], BS), 24) == (0, False)
        # a different token in chunk 1 ends the prefix there
        q = list(p)
        q[9] += 1
        assert b.scheduler.get_num_new_matched_tokens(FakeRequest("b7", q + [1], BS), 0) == (8, False)
        for rid in ("b1", "b2", "b3", "b4", "b5", "b6", "b7"):
            b.scheduler.request_finished(FakeRequest(rid, [], BS), [])
        assert b.scheduler.backend.store.leases.stats().active == 0  # type: ignore[attr-defined]
    finally:
        a.close()
        b.close()


def test_cache_salt_isolates_tenants(store_id: str) -> None:
    a = FakeEngine(KVStoreConnector, make_config(settings(store_id)))
    try:
        p = prompt(17, seed=3)
        a.run_prefill(FakeRequest("a", p, BS, cache_salt="tenant-1"))
        same = FakeRequest("x", p, BS, cache_salt="tenant-1")
        other = FakeRequest("y", p, BS, cache_salt="tenant-2")
        other.block_hashes = list(same.block_hashes)  # even identical engine hashes do not cross tenants
        unsalted = FakeRequest("z", p, BS)
        unsalted.block_hashes = list(same.block_hashes)
        assert a.scheduler.get_num_new_matched_tokens(same, 0) == (16, False)
        assert a.scheduler.get_num_new_matched_tokens(other, 0) == (0, False)
        assert a.scheduler.get_num_new_matched_tokens(unsalted, 0) == (0, False)
    finally:
        a.close()


@pytest.mark.parametrize(
    ("layout", "split"), [("heads_tokens", 1), ("kv_blocks", 1), ("blocks_kv", 1), ("heads_tokens", 2)]
)
def test_save_then_load_round_trips_bit_exactly(store_id: str, layout: str, split: int) -> None:
    a = FakeEngine(KVStoreConnector, make_config(settings(store_id)), layout=layout, kernel_split=split)
    b = FakeEngine(KVStoreConnector, make_config(settings(store_id)), layout=layout, kernel_split=split)
    try:
        p = prompt(29, seed=5)
        ra = a.run_prefill(FakeRequest("a", p, BS))
        assert a.worker.worker.stats["chunks_saved"] == 3  # type: ignore[union-attr]
        b.free = b.free[::-1]  # other block ids than the saving engine used
        req = FakeRequest("b", p, BS)
        ext, _ = b.scheduler.get_num_new_matched_tokens(req, 0)
        assert ext == 24
        # what the worker will do: only load, no forward pass, so every loaded slot comes from the store
        rb = b.run_prefill(FakeRequest("b", p, BS), forward=False)
        assert rb.external_tokens == 24 and rb.load_errors == set()
        for pos in range(24):
            assert b.token_matches(req, rb.block_ids, pos), pos
            blk, off = rb.block_ids[pos // BS], pos % BS
            blk_a = ra.block_ids[pos // BS]
            for layer in range(a.layers):
                assert torch.equal(b.slot_kv(layer, blk, off), a.slot_kv(layer, blk_a, off))
        # tokens past the hit were not touched by the load
        assert not b.slot_kv(0, rb.block_ids[6], 0).any()
        assert b.worker.worker.stats["chunks_loaded"] == 3  # type: ignore[union-attr]
    finally:
        a.close()
        b.close()


def test_load_after_a_local_hit_writes_only_the_new_blocks(store_id: str) -> None:
    a = FakeEngine(KVStoreConnector, make_config(settings(store_id)))
    b = FakeEngine(KVStoreConnector, make_config(settings(store_id)))
    try:
        p = prompt(25, seed=9)
        a.run_prefill(FakeRequest("a", p, BS))
        req = FakeRequest("b", p, BS)
        rb = b.run_prefill(req, local_computed=4, forward=False)  # vLLM already holds block 0
        assert rb.external_tokens == 20 and rb.load_errors == set()
        assert not b.slot_kv(0, rb.block_ids[0], 0).any()  # the locally held block was left alone
        assert all(b.token_matches(req, rb.block_ids, pos) for pos in range(4, 24))
    finally:
        a.close()
        b.close()


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_chunk_that_vanishes_before_the_load_is_reported_with_exactly_its_blocks() -> None:
    """Chunk 1 of 3 vanishes between lookup and load: exactly its two blocks are reported, the others load."""
    clock = _Clock()
    store = TieredStore(build_tiers(TiersConfig(cpu_bytes=1 << 20)), StoreConfig(lease_ttl_s=5.0), clock=clock)
    backend = LocalBackend(store, EventQueue())
    cfg = make_config({"chunk_tokens": C, "lease_ttl_s": 5.0})
    a = FakeEngine(KVStoreConnector, cfg, backend=backend)
    b = FakeEngine(KVStoreConnector, cfg, backend=backend)
    try:
        p = prompt(25, seed=13)
        a.run_prefill(FakeRequest("a", p, BS))
        req = FakeRequest("b", p, BS)
        ext, _ = b.scheduler.get_num_new_matched_tokens(req, 0)
        assert ext == 24
        b.scheduler.update_state_after_alloc(req, None, ext)
        clock.now += 10
        store.leases.expire()
        ns = namespace_for(engine_geometry(cfg, C, None), "default")
        assert store.delete(ns, engine_prefix_keys(ns, req.block_hashes, BS)[1])
        block_ids = [50, 51, 52, 53, 54, 55, 56]
        meta = b.scheduler.build_connector_meta(
            SchedulerOutput([NewRequestData("b", p, [], None, None, (block_ids,), ext, None)],
                            CachedRequestData(), {"b": 1}, 1)
        )
        b.worker.bind_connector_metadata(meta)
        b.worker.start_load_kv(None)
        assert b.worker.get_block_ids_with_load_errors() == {52, 53}
        assert b.worker.get_block_ids_with_load_errors() == set()  # reported once
        for pos in list(range(8)) + list(range(16, 24)):
            assert b.token_matches(req, block_ids, pos)
    finally:
        a.close()
        b.close()


def test_chunked_prefill_saves_each_chunk_once_as_it_completes(store_id: str) -> None:
    eng = FakeEngine(KVStoreConnector, make_config(settings(store_id)))
    try:
        p = prompt(30, seed=17)
        req = FakeRequest("r", p, BS)
        ext, _ = eng.scheduler.get_num_new_matched_tokens(req, 0)
        eng.scheduler.update_state_after_alloc(req, None, ext)
        ids = [eng.free.pop(0) for _ in range(8)]
        steps = [(0, 12, ids[:3], True), (12, 12, ids[3:6], False), (24, 6, ids[6:], False)]
        saved_per_step = []
        for computed, n, new_ids, first in steps:
            if first:
                out = SchedulerOutput([NewRequestData("r", p, [], None, None, (new_ids,), computed, None)],
                                      CachedRequestData(), {"r": n}, n)
            else:
                out = SchedulerOutput([], CachedRequestData(["r"], set(), [[]], {}, [(new_ids,)], [computed], [0]),
                                      {"r": n}, n)
            meta = eng.scheduler.build_connector_meta(out)
            assert isinstance(meta, KVStoreConnectorMetadata)
            saved_per_step.append([(s.first_chunk, len(s.block_ids)) for s in meta.saves])
            eng.worker.bind_connector_metadata(meta)
            eng.worker.start_load_kv(None)
            for pos in range(computed, computed + n):  # the forward pass of this step
                for layer in range(eng.layers):
                    kv = token_kv(p[pos], pos, layer, eng.heads, eng.dim, eng.dtype)
                    eng.write_slot(layer, ids[pos // BS], pos % BS, kv)
            eng.worker.wait_for_save()
            eng.worker.clear_connector_metadata()
        # after 12 tokens chunk 0 is whole; after 24, chunks 1 and 2; tokens 24..29 never fill chunk 3
        assert saved_per_step == [[(0, 2)], [(1, 4)], []]
        eng.finish(req, ids)
        other = FakeEngine(KVStoreConnector, make_config(settings(store_id)))
        try:
            r2 = other.run_prefill(FakeRequest("r2", p, BS), forward=False)
            assert r2.external_tokens == 24 and r2.load_errors == set()
            assert all(other.token_matches(req, r2.block_ids, pos) for pos in range(24))
        finally:
            other.close()
    finally:
        eng.close()


def test_resumed_request_loads_into_its_new_blocks(store_id: str) -> None:
    a = FakeEngine(KVStoreConnector, make_config(settings(store_id)))
    b = FakeEngine(KVStoreConnector, make_config(settings(store_id)))
    try:
        p = prompt(21, seed=19)
        a.run_prefill(FakeRequest("a", p, BS))
        req = FakeRequest("b", p, BS)
        first = b.run_prefill(req, forward=True)  # admitted, loaded, computed ... then preempted
        assert first.external_tokens == 16
        ext, _ = b.scheduler.get_num_new_matched_tokens(req, 0)  # re-admitted after preemption
        b.scheduler.update_state_after_alloc(req, None, ext)
        new_ids = [60, 61, 62, 63, 59, 58]
        cached = CachedRequestData(["b"], {"b"}, [[]], {}, [(new_ids,)], [ext], [0])
        meta = b.scheduler.build_connector_meta(SchedulerOutput([], cached, {"b": 5}, 5))
        assert isinstance(meta, KVStoreConnectorMetadata) and [ld.block_ids for ld in meta.loads] == [tuple(new_ids[:4])]
        b.worker.bind_connector_metadata(meta)
        b.worker.start_load_kv(None)
        assert b.worker.get_block_ids_with_load_errors() == set()
        assert all(b.token_matches(req, new_ids, pos) for pos in range(16))
    finally:
        a.close()
        b.close()


def test_bad_configuration_and_misuse_raise_typed_errors(store_id: str) -> None:
    with pytest.raises(InvalidInput, match="unknown kvstore adapter settings"):
        KVStoreConnector(make_config({"chunk_token": 8}), KVConnectorRole.SCHEDULER, None)
    with pytest.raises(InvalidInput, match="must be int"):
        KVStoreConnector(make_config({"chunk_tokens": "8"}), KVConnectorRole.SCHEDULER, None)
    with pytest.raises(InvalidInput, match="multiple of vLLM's block size"):
        KVStoreConnector(make_config(settings(store_id, chunk_tokens=6)), KVConnectorRole.SCHEDULER, None)
    with pytest.raises(InvalidInput, match="needs a url"):
        KVStoreConnector(make_config({"backend": "daemon"}), KVConnectorRole.WORKER, None)
    with pytest.raises(ValueError, match="kv_transfer_config must be set"):
        cfg = make_config()
        cfg.kv_transfer_config = None
        KVStoreConnector(cfg, KVConnectorRole.WORKER, None)
    cfg = make_config(settings(store_id))
    cfg.cache_config.cache_dtype = "fp8_inc"
    with pytest.raises(InvalidInput, match="not supported"):
        KVStoreConnector(cfg, KVConnectorRole.WORKER, None)
    sched = KVStoreConnector(make_config(settings(store_id)), KVConnectorRole.SCHEDULER, None)
    worker = KVStoreConnector(make_config(settings(store_id)), KVConnectorRole.WORKER, None)
    try:
        with pytest.raises(InvalidInput, match="worker-side method"):
            sched.register_kv_caches({})
        with pytest.raises(InvalidInput, match="scheduler-side method"):
            worker.get_num_new_matched_tokens(FakeRequest("x", prompt(9), BS), 0)
        good = {f"model.layers.{i}.attn": torch.zeros(8, 2, BS, 16, dtype=torch.bfloat16) for i in range(3)}
        with pytest.raises(ShapeMismatch, match="2 KV cache layers registered; the model config says 3"):
            worker.register_kv_caches(dict(list(good.items())[:2]))
        with pytest.raises(DTypeMismatch):
            worker.register_kv_caches({k: v.float() for k, v in good.items()})
        with pytest.raises(ShapeMismatch, match="no known layout"):
            worker.register_kv_caches({k: torch.zeros(8, 3, BS, 16, dtype=torch.bfloat16) for k in good})
        with pytest.raises(ShapeMismatch, match="not a kv_blocks cache"):
            bad = KVStoreConnector(make_config(settings(store_id, paged_layout="kv_blocks")), KVConnectorRole.WORKER)
            try:
                bad.register_kv_caches(good)
            finally:
                bad.shutdown()
        worker.register_kv_caches(good)
    finally:
        sched.shutdown()
        worker.shutdown()


@pytest.mark.gpu
def test_round_trip_between_cuda_paged_caches(store_id: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    a = FakeEngine(KVStoreConnector, make_config(settings(store_id)), device="cuda")
    b = FakeEngine(KVStoreConnector, make_config(settings(store_id)), device="cuda")
    try:
        p = prompt(33, seed=23)
        a.run_prefill(FakeRequest("a", p, BS))
        req = FakeRequest("b", p, BS)
        rb = b.run_prefill(req, forward=False)
        assert rb.external_tokens == 32 and rb.load_errors == set()
        assert all(b.token_matches(req, rb.block_ids, pos) for pos in range(32))
    finally:
        a.close()
        b.close()
