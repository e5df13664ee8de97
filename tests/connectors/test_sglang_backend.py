"""The SGLang HiCache storage backend against a host pool built to the pinned release's API (0.5.23).

``FakeHostPool`` follows SGLang's MHA host pool: a ``layer_first`` buffer
``(2, layers, slots, heads, head_dim)`` or a ``page_first`` one
``(2, slots, layers, heads, head_dim)``; ``get_data_page`` returns one page
(flattened), ``get_dummy_flat_data_page`` a blank flat page, and
``set_from_flat_data_page`` writes a flat page back.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from kvstore.connectors.sglang import KVStoreHiCacheStorage
from kvstore.connectors.sglang_compat import HiCacheStorage, HiCacheStorageConfig
from kvstore.connectors.vllm_backend import SHARED_STORES
from kvstore.errors import InvalidInput

PAGE = 4
_ids = itertools.count()


class FakeHostPool:
    def __init__(self, layout: str = "layer_first", slots: int = 64, layers: int = 2, heads: int = 2, dim: int = 8,
                 dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> None:
        self.layout, self.page_size, self.size = layout, PAGE, slots
        self.layer_num, self.head_num, self.head_dim, self.dtype = layers, heads, dim, dtype
        dims = (2, layers, slots, heads, dim) if layout == "layer_first" else (2, slots, layers, heads, dim)
        g = torch.Generator().manual_seed(seed)
        self.kv_buffer = torch.randn(dims, generator=g).to(dtype)

    def _page(self, index: int) -> torch.Tensor:
        if self.layout == "layer_first":
            return self.kv_buffer[:, :, index : index + self.page_size]
        return self.kv_buffer[:, index : index + self.page_size]

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        page = self._page(index)
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros((2, self.layer_num, self.page_size, self.head_num, self.head_dim), dtype=self.dtype).flatten()

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        page = self._page(index)
        page[...] = data_page.reshape(page.shape)


def storage_config(extra: dict[str, Any], **fields: Any) -> HiCacheStorageConfig:
    base: dict[str, Any] = {
        "tp_rank": 0, "tp_size": 1, "pp_rank": 0, "pp_size": 1, "attn_cp_rank": 0, "attn_cp_size": 1,
        "is_mla_model": False, "enable_storage_metrics": False, "is_page_first_layout": False,
        "model_name": "test/tiny-llama",
    }
    base.update(fields)
    return HiCacheStorageConfig(**base, extra_config={
        "backend_name": "kvstore", "module_path": "kvstore.connectors.sglang",
        "class_name": "KVStoreHiCacheStorage", "interface_v1": 1, "cpu_bytes": 1 << 20, **extra,
    })


@pytest.fixture
def store_id() -> Iterator[str]:
    sid = f"sglang-{next(_ids)}"
    yield sid
    assert sid not in SHARED_STORES.open_ids()


def make(store_id: str, pool: FakeHostPool, **fields: Any) -> KVStoreHiCacheStorage:
    backend = KVStoreHiCacheStorage(storage_config({"store_id": store_id}, **fields), {})
    backend.register_mem_pool_host(pool)
    return backend


def hashes(n: int, salt: str = "") -> list[str]:
    return [f"{salt}{i:064x}" for i in range(n)]


def test_loaded_the_way_sglang_loads_it(store_id: str) -> None:
    cfg = storage_config({"store_id": store_id})
    extra = cfg.extra_config or {}
    cls = getattr(importlib.import_module(extra["module_path"]), extra["class_name"])
    assert issubclass(cls, HiCacheStorage)
    backend = cls(cfg, {})  # the factory's call: backend_class(storage_config, kwargs)
    backend.register_mem_pool_host(FakeHostPool())
    backend.close()


def test_set_get_round_trip(store_id: str) -> None:
    pool = FakeHostPool(seed=1)
    s = make(store_id, pool)
    try:
        keys = hashes(3)
        pages = [pool.get_data_page(i * PAGE).contiguous() for i in range(3)]
        assert s.set(keys[0], pages[0]) is True
        assert s.batch_set(keys[1:], pages[1:]) is True
        got = s.get(keys[0], pool.get_dummy_flat_data_page())
        assert got is not None and torch.equal(got, pages[0])
        fetched = s.batch_get(keys + ["f" * 64], [pool.get_dummy_flat_data_page() for _ in range(4)])
        assert [torch.equal(g, p) for g, p in zip(fetched[:3], pages)] == [True] * 3  # type: ignore[arg-type]
        assert fetched[3] is None
        assert s.get("e" * 64) is None  # a blank page is made when no target is given
        assert s.exists(keys[2]) and not s.exists("e" * 64)
    finally:
        s.close()


def test_batch_exists_counts_leading_hits_only(store_id: str) -> None:
    pool = FakeHostPool(seed=2)
    s = make(store_id, pool)
    try:
        k = hashes(5)
        for i in (0, 1, 3, 4):
            assert s.set(k[i], pool.get_data_page(i * PAGE).contiguous())
        assert s.batch_exists(k) == 2
        assert s.batch_exists(k[2:]) == 0
        assert s.batch_exists(k[3:]) == 2
        assert s.batch_exists([]) == 0
    finally:
        s.close()


def test_zero_copy_v1_moves_pages_between_host_pools(store_id: str) -> None:
    src, dst = FakeHostPool(seed=3), FakeHostPool(seed=4)
    a, b = make(store_id, src), make(store_id, dst)
    try:
        keys = hashes(3, "a")
        assert a.batch_set_v1(keys, torch.arange(4 * PAGE, 7 * PAGE)) == [True] * 3
        keys_plus = keys[:1] + ["9" * 64] + keys[2:]
        # the second page is missing: the first lands, then the load stops
        assert b.batch_get_v1(keys_plus, torch.arange(0, 3 * PAGE)) == [True, False, False]
        assert torch.equal(dst.get_data_page(0), src.get_data_page(4 * PAGE))
        assert b.batch_get_v1(keys, torch.arange(8 * PAGE, 11 * PAGE)) == [True] * 3
        for i in range(3):
            assert torch.equal(dst.get_data_page((8 + i) * PAGE), src.get_data_page((4 + i) * PAGE))
    finally:
        a.close()
        b.close()


def test_layout_shard_and_salt_isolate(store_id: str) -> None:
    lf, pf = FakeHostPool("layer_first", seed=5), FakeHostPool("page_first", seed=5)
    a, b = make(store_id, lf), make(store_id, pf)
    rank1 = make(store_id, FakeHostPool(seed=5), tp_rank=1, tp_size=2)
    other = KVStoreHiCacheStorage(storage_config({"store_id": store_id, "default_tenant": "t2"}), {})
    other.register_mem_pool_host(FakeHostPool(seed=5))
    try:
        key = hashes(1)
        assert a.batch_set_v1(key, torch.arange(PAGE))
        assert a.batch_exists(key) == 1
        assert b.batch_exists(key) == 0  # page_first bytes mean something else
        assert rank1.batch_exists(key) == 0  # another tensor-parallel shard
        assert other.batch_exists(key) == 0  # another tenant
    finally:
        for s in (a, b, rank1, other):
            s.close()


def test_mla_replicas_share_pages_and_only_the_writer_writes(store_id: str) -> None:
    pool = FakeHostPool(seed=6, heads=1)
    writer = make(store_id, pool, is_mla_model=True, tp_rank=0, tp_size=2)
    replica = make(store_id, FakeHostPool(seed=7, heads=1), is_mla_model=True, tp_rank=1, tp_size=2)
    try:
        assert replica.batch_set_v1(hashes(1, "r"), torch.arange(PAGE)) == [True]  # skipped: not the writer
        assert writer.batch_exists(hashes(1, "r")) == 0
        assert writer.batch_set_v1(hashes(1, "w"), torch.arange(PAGE)) == [True]
        assert replica.batch_exists(hashes(1, "w")) == 1  # the same pages for every rank
    finally:
        writer.close()
        replica.close()


def test_clear_removes_this_namespace(store_id: str) -> None:
    pool = FakeHostPool(seed=8)
    s = make(store_id, pool)
    try:
        keys = hashes(2)
        assert s.batch_set_v1(keys, torch.arange(2 * PAGE)) == [True, True]
        assert s.clear() is None
        assert s.batch_exists(keys) == 0
    finally:
        s.close()


def test_bad_input_raises_clear_errors(store_id: str) -> None:
    with pytest.raises(InvalidInput, match="unknown kvstore adapter settings"):
        KVStoreHiCacheStorage(storage_config({"store_id": store_id, "cpu_byte": 1}), {})
    with pytest.raises(InvalidInput, match="needs a url"):
        KVStoreHiCacheStorage(storage_config({"backend": "daemon"}), {})
    unregistered = KVStoreHiCacheStorage(storage_config({"store_id": store_id}), {})
    with pytest.raises(InvalidInput, match="register_mem_pool_host"):
        unregistered.batch_exists(hashes(1))
    unregistered.close()
    pool = FakeHostPool()
    s = make(store_id, pool)
    try:
        with pytest.raises(InvalidInput, match="bytes"):
            s.set(hashes(1)[0], torch.zeros(3, dtype=torch.bfloat16))
        with pytest.raises(InvalidInput, match="2 keys but 1 values"):
            s.batch_set(hashes(2), [pool.get_dummy_flat_data_page()])
        with pytest.raises(InvalidInput, match="non-empty strings"):
            s.batch_exists([b"raw"])  # type: ignore[list-item]
        with pytest.raises(InvalidInput, match="host indices"):
            s.batch_set_v1(hashes(2), torch.arange(PAGE))
        with pytest.raises(InvalidInput, match="torch tensor"):
            s.set(hashes(1)[0], b"not a tensor")
    finally:
        s.close()
