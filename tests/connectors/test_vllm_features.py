"""vLLM connector: decode-phase saves, asynchronous loads, MLA caches and tensor-parallel shards.

Each test drives real connector objects through the fake vLLM engine of
test_vllm_fakes.py (one scheduler, one worker per tensor rank, real paged
tensors) against a real in-process store, and checks the KV bytes that land
in the pages.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import pytest
import torch

from kvstore.connectors.vllm import KVStoreConnector
from kvstore.connectors.vllm_compat import KVConnectorRole
from kvstore.connectors.vllm_meta import KVStoreConnectorMetadata
from kvstore.connectors.vllm_spec import engine_geometry, namespace_for, shard_geometries
from kvstore.errors import InvalidInput, ShapeMismatch
from kvstore.keys import engine_prefix_keys
from tests.connectors.test_vllm_connector import BS, C, prompt, settings, store_id  # noqa: F401 (store_id: a fixture)
from tests.connectors.test_vllm_fakes import (
    CachedRequestData,
    FakeEngine,
    FakeKVCacheBlocks,
    FakeRequest,
    SchedulerOutput,
    make_config,
    rank_config,
)


def store_of(eng: FakeEngine) -> Any:
    return eng.scheduler.backend.store


def chunks_held(eng: FakeEngine, request: FakeRequest, rank: int = 0) -> int:
    """Leading chunks of ``request`` the store holds in ``rank``'s namespace."""
    geometry = engine_geometry(rank_config(eng.config, rank), C, None)
    ns = eng.scheduler.backend.register(namespace_for(geometry, "default"))
    keys = engine_prefix_keys(ns, list(request.block_hashes), BS)
    return int(eng.scheduler.backend.lookup(ns, keys, lease=False).chunks)


# ---------------------------------------------------------------- decode-phase saves


def decode(eng: FakeEngine, req: FakeRequest, block_ids: list[int], steps: int, seed: int) -> list[list[tuple[int, int]]]:
    """``steps`` decode steps after the prefill; returns each step's saves as (first_chunk, blocks)."""
    saves = []
    for step in range(steps):
        req.append_output((seed + step * 13) % 32000)  # the token sampled by the previous step
        pos = req.num_tokens - 1  # this step computes its KV
        new_ids = [eng.free.pop(0)] if pos // BS >= len(block_ids) else []
        block_ids.extend(new_ids)
        out = eng.cached_output(req, new_ids, pos, 1)
        meta = eng.scheduler.build_connector_meta(out)
        assert isinstance(meta, KVStoreConnectorMetadata)
        saves.append([(s.first_chunk, len(s.block_ids)) for s in meta.saves])
        assert eng.worker_step(meta, functools.partial(eng.forward, req, block_ids, pos, pos + 1)) == set()
        req.num_computed_tokens = pos + 1
    return saves


def test_generated_tokens_are_saved_as_decoding_fills_chunks(store_id: str) -> None:
    eng = FakeEngine(KVStoreConnector, make_config(settings(store_id)))
    try:
        req = FakeRequest("r", prompt(13, seed=1), BS)
        first = eng.run_prefill(req)
        assert chunks_held(eng, req) == 1  # the prompt's one whole chunk
        block_ids = list(first.block_ids)
        # tokens 13 .. 23 computed one per step: chunk 1 is whole after token 15, chunk 2 after token 23
        saves = decode(eng, req, block_ids, 12, seed=5)
        assert [i for i, s in enumerate(saves) if s] == [2, 10]
        assert saves[2] == [(1, 2)] and saves[10] == [(2, 2)]
        eng.finish(req, block_ids)
        # a follow-up turn whose prompt is the whole conversation loads the reply's KV too
        other = FakeEngine(KVStoreConnector, make_config(settings(store_id)))
        try:
            follow = FakeRequest("f", req.all_token_ids + [7, 8, 9], BS)
            got = other.run_prefill(follow, forward=False)
            assert got.external_tokens == 24 and got.load_errors == set()
            assert all(other.token_matches(follow, got.block_ids, pos) for pos in range(24))
        finally:
            other.close()
    finally:
        eng.close()


def test_save_decode_off_stores_prompt_chunks_only(store_id: str) -> None:
    eng = FakeEngine(KVStoreConnector, make_config(settings(store_id, save_decode=False)))
    try:
        req = FakeRequest("r", prompt(13, seed=2), BS)
        block_ids = list(eng.run_prefill(req).block_ids)
        assert decode(eng, req, block_ids, 12, seed=6) == [[]] * 12
        assert chunks_held(eng, req) == 1
    finally:
        eng.close()


# ---------------------------------------------------------------- asynchronous loads


def wait_finished(eng: FakeEngine, timeout_s: float = 10.0) -> set[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sending, recving = eng.worker.get_finished(set())
        assert sending is None
        if recving:
            return set(recving)
        time.sleep(0.005)
    raise AssertionError("the asynchronous load never finished")


def async_admit(eng: FakeEngine, req: FakeRequest) -> tuple[int, list[int], KVStoreConnectorMetadata]:
    """What vLLM does for a request with an asynchronous hit: allocate, plan the load, leave it unscheduled."""
    ext, is_async = eng.scheduler.get_num_new_matched_tokens(req, 0)
    assert is_async is True
    block_ids = [eng.free.pop(0) for _ in range(-(-req.num_tokens // BS))]
    eng.scheduler.update_state_after_alloc(req, FakeKVCacheBlocks(block_ids), ext)
    meta = eng.scheduler.build_connector_meta(SchedulerOutput([], CachedRequestData(), {}, 0))
    assert isinstance(meta, KVStoreConnectorMetadata)
    return ext, block_ids, meta


def test_async_load_is_reported_by_get_finished_then_the_request_runs(store_id: str) -> None:
    a = FakeEngine(KVStoreConnector, make_config(settings(store_id)))
    b = FakeEngine(KVStoreConnector, make_config(settings(store_id, async_load=True)))
    try:
        p = prompt(29, seed=3)
        a.run_prefill(FakeRequest("a", p, BS))
        req = FakeRequest("b", p, BS)
        assert b.scheduler.get_num_new_matched_tokens(FakeRequest("miss", prompt(9, seed=99), BS), 0) == (0, False)
        b.scheduler.request_finished(FakeRequest("miss", [], BS), [])
        ext, block_ids, meta = async_admit(b, req)
        assert ext == 24 and [(ld.req_id, ld.is_async, ld.block_ids) for ld in meta.loads] == [
            ("b", True, tuple(block_ids[:6]))
        ]
        assert b.worker_step(meta) == set()
        assert wait_finished(b) == {"b"}
        assert b.worker.get_finished(set()) == (None, None)  # reported once
        assert all(b.token_matches(req, block_ids, pos) for pos in range(24))
        assert not b.slot_kv(0, block_ids[6], 0).any()
        # vLLM now schedules the request with the loaded tokens computed: nothing is loaded again
        out = b.make_output(req, block_ids, 24, 5)
        meta2 = b.scheduler.build_connector_meta(out)
        assert isinstance(meta2, KVStoreConnectorMetadata) and meta2.loads == [] and meta2.saves == []
        assert b.worker_step(meta2, lambda: b.forward(req, block_ids, 24, 29)) == set()
        b.finish(req, block_ids)
        assert store_of(b).leases.stats().active == 0
    finally:
        a.close()
        b.close()


def test_async_load_of_a_vanished_chunk_reports_its_blocks_and_finishes(store_id: str) -> None:
    a = FakeEngine(KVStoreConnector, make_config(settings(store_id)))
    b = FakeEngine(KVStoreConnector, make_config(settings(store_id, async_load=True)))
    try:
        p = prompt(25, seed=4)
        a.run_prefill(FakeRequest("a", p, BS))
        req = FakeRequest("b", p, BS)
        ext, block_ids, meta = async_admit(b, req)
        assert ext == 24
        ns = namespace_for(engine_geometry(b.config, C, None), "default")
        store_of(b).leases.release(meta.loads[0].lease_of(0, 0))
        assert store_of(b).delete(ns, engine_prefix_keys(ns, req.block_hashes, BS)[2])
        assert b.worker_step(meta) == set()  # errors are reported with the finished request, not before
        assert wait_finished(b) == {"b"}
        assert b.worker.get_block_ids_with_load_errors() == set(block_ids[4:6])
        assert b.worker.get_block_ids_with_load_errors() == set()
        assert all(b.token_matches(req, block_ids, pos) for pos in range(16))
    finally:
        a.close()
        b.close()


def test_async_load_needs_the_allocated_blocks(store_id: str) -> None:
    a = FakeEngine(KVStoreConnector, make_config(settings(store_id)))
    b = FakeEngine(KVStoreConnector, make_config(settings(store_id, async_load=True)))
    try:
        p = prompt(17, seed=8)
        a.run_prefill(FakeRequest("a", p, BS))
        req = FakeRequest("b", p, BS)
        assert b.scheduler.get_num_new_matched_tokens(req, 0) == (16, True)
        with pytest.raises(InvalidInput, match="KVCacheBlocks"):
            b.scheduler.update_state_after_alloc(req, None, 16)
        b.scheduler.request_finished(req, [])
    finally:
        a.close()
        b.close()
    with pytest.raises(InvalidInput, match="must be a bool"):
        KVStoreConnector(make_config(settings(store_id, async_load="yes")), KVConnectorRole.SCHEDULER, None)


# ---------------------------------------------------------------- MLA


@pytest.mark.parametrize("tp", [1, 2])
def test_mla_latents_round_trip_one_copy_for_every_tensor_rank(store_id: str, tp: int) -> None:
    cfg = make_config(settings(store_id), tp=tp, use_mla=True, head_dim=24, layers=2)
    a = FakeEngine(KVStoreConnector, cfg)
    b = FakeEngine(KVStoreConnector, cfg)
    try:
        g = engine_geometry(cfg, C, None)
        assert g.spec.layout == "mla_latent" and g.spec.chunk_shape(C) == (2, C, 24)
        assert len(shard_geometries(cfg, C, None)) == 1  # every tensor rank reads the same chunks
        p = prompt(21, seed=10)
        a.run_prefill(FakeRequest("a", p, BS))
        saved = [w.worker.stats["chunks_saved"] for w in a.workers]
        assert saved == [2] + [0] * (tp - 1)  # tensor rank 0 writes
        req = FakeRequest("b", p, BS)
        rb = b.run_prefill(req, forward=False)
        assert rb.external_tokens == 16 and rb.load_errors == set()
        for rank in range(tp):
            for pos in range(16):
                for layer in range(b.layers):
                    got = b.slot_kv(layer, rb.block_ids[pos // BS], pos % BS, rank=rank)
                    assert torch.equal(got, b.kv_of(p[pos], pos, layer)), (rank, pos, layer)
    finally:
        a.close()
        b.close()


def test_mla_caches_must_be_latent_pages(store_id: str) -> None:
    worker = KVStoreConnector(make_config(settings(store_id), use_mla=True, head_dim=24), KVConnectorRole.WORKER)
    try:
        with pytest.raises(ShapeMismatch):
            worker.register_kv_caches({f"l.{i}": torch.zeros(8, 2, BS, 1, 24, dtype=torch.bfloat16) for i in range(3)})
        with pytest.raises(ShapeMismatch):
            worker.register_kv_caches({f"l.{i}": torch.zeros(8, BS, 16, dtype=torch.bfloat16) for i in range(3)})
        worker.register_kv_caches({f"l.{i}": torch.zeros(8, BS, 24, dtype=torch.bfloat16) for i in range(3)})
    finally:
        worker.shutdown()


# ---------------------------------------------------------------- tensor parallel


def test_each_tensor_rank_stores_and_loads_its_own_shard(store_id: str) -> None:
    cfg = make_config(settings(store_id), tp=2, kv_heads=4)
    a = FakeEngine(KVStoreConnector, cfg)
    b = FakeEngine(KVStoreConnector, cfg)
    try:
        shards = shard_geometries(cfg, C, None)
        assert [(s.spec.shard.tp_rank, s.spec.shard.tp_size, s.spec.num_kv_heads) for s in shards] == [
            (0, 2, 2), (1, 2, 2)
        ]
        p = prompt(25, seed=12)
        ra = a.run_prefill(FakeRequest("a", p, BS))
        assert [w.worker.stats["chunks_saved"] for w in a.workers] == [3, 3]
        req = FakeRequest("b", p, BS)
        assert chunks_held(a, req, rank=0) == 3 and chunks_held(a, req, rank=1) == 3
        b.free = b.free[::-1]
        rb = b.run_prefill(req, forward=False)
        assert rb.external_tokens == 24 and rb.load_errors == set()
        for pos in range(24):
            assert b.token_matches(req, rb.block_ids, pos), pos
            for rank in (0, 1):  # each rank holds its own two heads, as the saving engine did
                got = b.slot_kv(1, rb.block_ids[pos // BS], pos % BS, rank=rank)
                assert torch.equal(got, a.slot_kv(1, ra.block_ids[pos // BS], pos % BS, rank=rank))
                assert torch.equal(got, b.kv_of(p[pos], pos, 1)[:, 2 * rank : 2 * rank + 2])
    finally:
        a.close()
        b.close()


def test_a_hit_is_what_every_tensor_rank_holds(store_id: str) -> None:
    cfg = make_config(settings(store_id), tp=2, kv_heads=4)
    a = FakeEngine(KVStoreConnector, cfg)
    try:
        p = prompt(25, seed=14)
        a.run_prefill(FakeRequest("a", p, BS))
        req = FakeRequest("b", p, BS)
        rank1 = namespace_for(engine_geometry(rank_config(cfg, 1), C, None), "default")
        assert store_of(a).delete(rank1, engine_prefix_keys(rank1, req.block_hashes, BS)[1])
        # rank 0 still holds 3 chunks, rank 1 only the first: one chunk is planned, and it loads everywhere
        other = FakeEngine(KVStoreConnector, cfg)
        try:
            rb = other.run_prefill(req, forward=False)
            assert rb.external_tokens == 8 and rb.load_errors == set()
            assert all(other.token_matches(req, rb.block_ids, pos) for pos in range(8))
            assert store_of(other).leases.stats().active == 0
        finally:
            other.close()
    finally:
        a.close()


def test_shards_of_a_replica_follow_tensor_and_pipeline_ranks(store_id: str) -> None:
    cfg = make_config(settings(store_id), tp=2, kv_heads=4, layers=4)
    cfg.parallel_config.pipeline_parallel_size = 2
    cfg.parallel_config.rank = 4 + 3  # data-parallel replica 1, pipeline stage 1, tensor rank 1
    shards = shard_geometries(cfg, C, None)
    got = [(g.spec.shard.tp_rank, g.spec.shard.pp_rank, g.spec.num_layers, g.writer) for g in shards]
    assert got == [(0, 0, 2, True), (1, 0, 2, True), (0, 1, 2, True), (1, 1, 2, True)]
    assert cfg.parallel_config.rank == 7  # the engine's config is left as it was
    mla = make_config(settings(store_id), tp=2, use_mla=True, head_dim=24)
    mla.parallel_config.rank = 1
    g = engine_geometry(mla, C, None)
    assert (g.spec.shard.tp_rank, g.spec.shard.tp_size, g.writer) == (0, 1, False)
