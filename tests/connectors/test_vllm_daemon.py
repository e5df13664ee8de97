"""Both engine adapters over a real kvstore daemon process (backend ``daemon``).

As in a multi-process engine, every connector object opens its own client:
the scheduler side's lookups lease chunks in the daemon, the worker side of
another engine reads them into its paged caches; SGLang pages go through the
same daemon. A chunk deleted by another client between lookup and load is
reported with exactly its blocks.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kvstore.client import Client
from kvstore.connectors.sglang import KVStoreHiCacheStorage
from kvstore.connectors.vllm import KVStoreConnector
from kvstore.connectors.vllm_meta import KVStoreConnectorMetadata
from kvstore.connectors.vllm_spec import engine_geometry, namespace_for
from kvstore.keys import engine_prefix_keys
from tests.connectors.test_sglang_backend import FakeHostPool, storage_config
from tests.connectors.test_vllm_fakes import (
    CachedRequestData,
    FakeEngine,
    FakeRequest,
    NewRequestData,
    SchedulerOutput,
    make_config,
)
from tests.service.dataplane_fixtures import DataPlaneProcess, start_dataplane

BS, C = 4, 8


@pytest.fixture(scope="module")
def daemon() -> Iterator[DataPlaneProcess]:
    dp = start_dataplane(cpu_bytes="16MiB")
    try:
        yield dp
    finally:
        dp.stop()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_vllm_round_trip_through_the_daemon(daemon: DataPlaneProcess, transport: str) -> None:
    url = daemon.tcp_url if transport == "tcp" else daemon.unix_url
    cfg = make_config({"backend": "daemon", "url": url, "chunk_tokens": C, "default_tenant": f"d-{transport}"})
    a, b = FakeEngine(KVStoreConnector, cfg), FakeEngine(KVStoreConnector, cfg)
    try:
        p = [(t * 13 + 7) % 32000 for t in range(27)]
        a.run_prefill(FakeRequest("a", p, BS))
        req = FakeRequest("b", p, BS)
        rb = b.run_prefill(req, forward=False)
        assert rb.external_tokens == 24 and rb.load_errors == set()
        assert all(b.token_matches(req, rb.block_ids, pos) for pos in range(24))
    finally:
        a.close()
        b.close()


def test_vllm_chunk_deleted_between_lookup_and_load(daemon: DataPlaneProcess) -> None:
    cfg = make_config({"backend": "daemon", "url": daemon.tcp_url, "chunk_tokens": C, "default_tenant": "d-gone"})
    a, b = FakeEngine(KVStoreConnector, cfg), FakeEngine(KVStoreConnector, cfg)
    try:
        p = [(t * 17 + 3) % 32000 for t in range(25)]
        a.run_prefill(FakeRequest("a", p, BS))
        req = FakeRequest("b", p, BS)
        ext, _ = b.scheduler.get_num_new_matched_tokens(req, 0)
        assert ext == 24
        b.scheduler.update_state_after_alloc(req, None, ext)
        ns = namespace_for(engine_geometry(cfg, C, None), "d-gone")
        key1 = engine_prefix_keys(ns, req.block_hashes, BS)[1]
        meta = b.scheduler.build_connector_meta(
            SchedulerOutput([NewRequestData("b", p, [], None, None, ([9, 8, 7, 6, 5, 4, 3],), ext, None)],
                            CachedRequestData(), {"b": 1}, 1)
        )
        assert isinstance(meta, KVStoreConnectorMetadata)
        with Client.connect(daemon.tcp_url) as other:
            other.register(ns)
            other.release(meta.loads[0].lease_of(0, 0))  # the lease is given up, then another client drops chunk 1
            assert other.delete(ns, key1)
        b.worker.bind_connector_metadata(meta)
        b.worker.start_load_kv(None)
        assert b.worker.get_block_ids_with_load_errors() == {7, 6}
        assert all(b.token_matches(req, [9, 8, 7, 6, 5, 4, 3], pos) for pos in [*range(8), *range(16, 24)])
    finally:
        a.close()
        b.close()


def test_sglang_pages_through_the_daemon(daemon: DataPlaneProcess) -> None:
    extra = {"backend": "daemon", "url": daemon.unix_url, "default_tenant": "sg"}
    src, dst = FakeHostPool(seed=21), FakeHostPool(seed=22)
    a = KVStoreHiCacheStorage(storage_config(extra), {})
    b = KVStoreHiCacheStorage(storage_config(extra), {})
    try:
        a.register_mem_pool_host(src)
        b.register_mem_pool_host(dst)
        keys = [f"{i:064x}" for i in range(3)]
        assert a.batch_set_v1(keys, torch.arange(0, 12)) == [True] * 3
        assert b.batch_exists(keys + ["f" * 64]) == 3
        assert b.batch_get_v1(keys, torch.arange(20, 32)) == [True] * 3
        for i in range(3):
            assert torch.equal(dst.get_data_page(20 + 4 * i), src.get_data_page(4 * i))
    finally:
        a.close()
        b.close()


def test_an_unreachable_daemon_is_a_miss_not_a_crash(tmp_path: object) -> None:
    from tests.redis_servers import free_port

    cfg = make_config({"backend": "daemon", "url": f"kvstore://127.0.0.1:{free_port()}", "chunk_tokens": C})
    eng = FakeEngine(KVStoreConnector, cfg)
    try:
        req = FakeRequest("r", [(t * 5) % 32000 for t in range(17)], BS)
        result = eng.run_prefill(req)  # lookup fails -> 0 tokens; the save fails -> counted, not raised
        assert result.external_tokens == 0 and result.load_errors == set()
        assert eng.worker.worker.stats["chunks_rejected"] == 2  # type: ignore[union-attr]
        assert all(eng.token_matches(req, result.block_ids, pos) for pos in range(17))
    finally:
        eng.close()
