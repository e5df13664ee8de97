"""The SGLang backend against the real SGLang package (opt-in: ``-m engines``; docs/engines.md).

Run in a virtual environment that has SGLang installed, with this checkout on
``PYTHONPATH``. SGLang's own storage factory builds the backend from the
dynamic-backend extra config, with SGLang's ``HiCacheStorageConfig``; page
keys are SGLang's own chained page hashes (``get_hash_str``).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

pytestmark = pytest.mark.engines
sglang = pytest.importorskip("sglang")

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

from kvstore.connectors import sglang_compat
from kvstore.connectors.sglang import KVStoreHiCacheStorage
from tests.connectors.test_sglang_backend import PAGE, FakeHostPool

_ids = itertools.count()


def real_config(**extra: Any) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=False,
        enable_storage_metrics=False, is_page_first_layout=False, model_name="test/tiny-llama",
        extra_config={"backend_name": "kvstore", "module_path": "kvstore.connectors.sglang",
                      "class_name": "KVStoreHiCacheStorage", "interface_v1": 1,
                      "store_id": f"sg-engine-{next(_ids)}", "cpu_bytes": 1 << 20, **extra},
    )


def page_hashes(tokens: list[int]) -> list[str]:
    """SGLang's chained page hashes of full pages."""
    from sglang.srt.mem_cache.utils import get_hash_str

    out: list[str] = []
    prior: str | None = None
    for i in range(len(tokens) // PAGE):
        prior = get_hash_str(tokens[i * PAGE : (i + 1) * PAGE], prior)  # type: ignore[assignment]
        out.append(prior)  # type: ignore[arg-type]
    return out


def test_the_real_factory_builds_the_backend_from_the_dynamic_config() -> None:
    assert sglang_compat.HAVE_SGLANG and sglang.__version__ == sglang_compat.PINNED_SGLANG
    assert issubclass(KVStoreHiCacheStorage, HiCacheStorage)
    backend = StorageBackendFactory.create_backend("dynamic", real_config(), None)
    assert isinstance(backend, KVStoreHiCacheStorage)
    backend.register_mem_pool_host(FakeHostPool())
    backend.close()


def test_pages_round_trip_under_sglang_hashes() -> None:
    cfg = real_config()
    a = StorageBackendFactory.create_backend("dynamic", cfg, None)
    b = StorageBackendFactory.create_backend("dynamic", cfg, None)
    src, dst = FakeHostPool(seed=1), FakeHostPool(seed=2)
    try:
        a.register_mem_pool_host(src)
        b.register_mem_pool_host(dst)
        keys = page_hashes(list(range(100, 113)))  # 3 full pages
        assert len(keys) == 3 and all(isinstance(k, str) for k in keys)
        info = HiCacheStorageExtraInfo(prefix_keys=None)
        assert a.batch_set_v1(keys, torch.arange(0, 3 * PAGE), info) == [True] * 3
        assert b.batch_exists(keys + page_hashes(list(range(200, 204))), info) == 3
        assert b.batch_get_v1(keys, torch.arange(40, 40 + 3 * PAGE), info) == [True] * 3
        for i in range(3):
            assert torch.equal(dst.get_data_page(40 + i * PAGE), src.get_data_page(i * PAGE))
        pages = b.batch_get(keys, [dst.get_dummy_flat_data_page() for _ in keys])
        assert all(p is not None and torch.equal(p, src.get_data_page(i * PAGE)) for i, p in enumerate(pages))
    finally:
        a.close()
        b.close()
