"""kvstore as an SGLang HiCache storage backend (pinned release: SGLang 0.5.23).

Load it with::

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvstore",
        "module_path": "kvstore.connectors.sglang", "class_name": "KVStoreHiCacheStorage",
        "interface_v1": 1, "backend": "daemon", "url": "unix:///run/kvstore.sock"}'

SGLang's storage factory imports ``module_path``, takes ``class_name`` from
it, checks that it subclasses ``HiCacheStorage`` and builds it with
``(storage_config, kwargs)``; then it calls ``register_mem_pool_host``.
SGLang's own keys (``backend_name``, ``module_path``, ``class_name``,
``interface_v1``, ...) are ignored here; the rest is
:class:`~kvstore.connectors.vllm_settings.AdapterSettings` (docs/engines.md).
With ``interface_v1`` SGLang calls ``batch_get_v1``/``batch_set_v1`` (pages
move between the host pool and the store inside the backend); without it,
``batch_get``/``batch_set`` with page tensors.

One SGLang page is one chunk, stored as the host pool's flat page bytes.
Keys are SGLang's page hashes (which already chain the cache salt) wrapped
under scheme ``sglang`` (docs/keys.md). The namespace names the model, the
shard, the pool's dtype and its host layout, so servers whose pages are laid
out differently never read each other's bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from kvstore.connectors.sglang_compat import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo
from kvstore.connectors.vllm_backend import ChunkBackend, open_backend
from kvstore.connectors.vllm_settings import AdapterSettings
from kvstore.errors import InvalidInput, KVStoreError
from kvstore.keys import ChunkKey, Namespace, engine_prefix_keys
from kvstore.spec import DTYPE_ITEMSIZE, DType, KVSpec, ModelFingerprint, Shard

__all__ = ["KVStoreHiCacheStorage"]

log = logging.getLogger(__name__)

#: keys of SGLang's dynamic-backend extra config that are SGLang's, not ours
SGLANG_KEYS = frozenset(
    {"backend_name", "module_path", "class_name", "interface_v1", "allocator", "file_storage_path", "tp_lcm_size",
     "prefetch_threshold", "prefetch_timeout_base", "prefetch_timeout_per_ki_token",
     "hicache_storage_pass_prefix_keys"}
)  # fmt: skip


class KVStoreHiCacheStorage(HiCacheStorage):
    """HiCache pages in kvstore.

    Invariant: ``ns`` and ``page_bytes`` are set by ``register_mem_pool_host``
    before any read or write; every stored chunk is exactly ``page_bytes`` long.
    """

    def __init__(
        self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None, *,
        backend: ChunkBackend | None = None,
    ) -> None:
        self.storage_config = storage_config
        extra = {k: v for k, v in (storage_config.extra_config or {}).items() if k not in SGLANG_KEYS}
        self.settings = AdapterSettings.from_mapping(extra)
        self.backend = backend if backend is not None else open_backend(self.settings)
        self.mem_pool_host: Any = None
        self.ns: Namespace | None = None
        self.page_bytes = 0
        self.page_size = 0
        self.counts = {"gets": 0, "hits": 0, "sets": 0, "stored": 0, "wrong_size": 0}

    # -- setup ------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Take the host pool; its geometry names the namespace."""
        self.mem_pool_host = mem_pool_host
        dummy = mem_pool_host.get_dummy_flat_data_page()
        self.page_bytes = int(dummy.numel() * dummy.element_size())
        self.page_size = int(mem_pool_host.page_size)
        self.ns = self.backend.register(self._namespace(mem_pool_host, dummy.dtype))

    def _namespace(self, pool: Any, dtype: torch.dtype) -> Namespace:
        cfg = self.storage_config
        dtype_name = str(dtype).removeprefix("torch.")
        known: DType = dtype_name if dtype_name in DTYPE_ITEMSIZE else "uint8"  # type: ignore[assignment]
        layout = str(getattr(pool, "layout", "layer_first"))
        revision = f"{self.settings.model_revision or ''}+sglang-host:{layout}:{dtype_name}:{self.page_bytes}"
        mla = bool(cfg.is_mla_model)
        head_dim = _pos(getattr(pool, "kv_lora_rank", 0)) + _pos(getattr(pool, "qk_rope_head_dim", 0)) if mla else 0
        spec = KVSpec(
            model=ModelFingerprint(cfg.model_name or "unknown-model", revision),
            num_layers=_pos(getattr(pool, "layer_num", 1)) or 1,
            num_kv_heads=1 if mla else (_pos(getattr(pool, "head_num", 1)) or 1),
            head_dim=head_dim or _pos(getattr(pool, "head_dim", 1)) or 1,
            dtype=known,
            layout="mla_latent" if mla else "kv_separate",
            # MLA KV is the same on every tensor-parallel rank: one shard for all of them
            shard=Shard(0 if mla else cfg.tp_rank, 1 if mla else cfg.tp_size, cfg.pp_rank, cfg.pp_size),
        )
        return Namespace(self.settings.default_tenant, spec, scheme="sglang", chunk_tokens=self.page_size)

    # -- lookups ----------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many of ``keys``, from the first, the store holds."""
        ns = self._ns()
        return self.backend.lookup(ns, self._keys(ns, keys), lease=False).chunks

    # -- reads ------------------------------------------------------------------------
    def get(self, key: str, target_location: Any | None = None, target_sizes: Any | None = None) -> torch.Tensor | None:
        got = self.batch_get([key], [target_location] if target_location is not None else None)
        return got[0]

    def batch_get(
        self, keys: list[str], target_locations: Any | None = None, target_sizes: Any | None = None
    ) -> list[torch.Tensor | None]:
        """Each page into its target (a fresh page where none is given); None where missing."""
        ns = self._ns()
        targets = list(target_locations) if target_locations is not None else [self._blank() for _ in keys]
        if len(targets) != len(keys):
            raise InvalidInput(f"{len(keys)} keys but {len(targets)} target locations")
        views = [self._bytes_of(t) for t in targets]
        sizes = self._read(ns, self._keys(ns, keys), views)
        return [t if n == self.page_bytes else None for t, n in zip(targets, sizes)]

    def batch_get_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: HiCacheStorageExtraInfo | None = None
    ) -> list[bool]:
        """Pages straight into the host pool at ``host_indices`` (one page per key); stops at the first miss."""
        ns, pool = self._ns(), self._pool()
        self._check_indices(keys, host_indices)
        out = [False] * len(keys)
        for i, key in enumerate(self._keys(ns, keys)):
            page = self._blank()
            if self._read(ns, [key], [self._bytes_of(page)])[0] != self.page_bytes:
                break
            pool.set_from_flat_data_page(int(host_indices[i * self.page_size]), page)
            out[i] = True
        return out

    def _read(self, ns: Namespace, keys: Sequence[ChunkKey], views: Sequence[torch.Tensor]) -> list[int | None]:
        try:
            sizes = self.backend.get_many(ns, keys, views, None)
        except (KVStoreError, OSError) as exc:  # an outage is a miss for HiCache, which recomputes
            log.warning("kvstore read failed: %s", exc)
            return [None] * len(keys)
        self.counts["gets"] += len(keys)
        self.counts["hits"] += sum(n == self.page_bytes for n in sizes)
        self.counts["wrong_size"] += sum(n is not None and n != self.page_bytes for n in sizes)
        return sizes

    # -- writes -----------------------------------------------------------------------
    def set(
        self, key: str, value: Any | None = None, target_location: Any | None = None, target_sizes: Any | None = None
    ) -> bool:
        return self.batch_set([key], [value])

    def batch_set(
        self, keys: list[str], values: Any | None = None, target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        """Store pages (flat page tensors); True if the store holds every one."""
        return all(self._write(keys, list(values) if values is not None else []))

    def batch_set_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: HiCacheStorageExtraInfo | None = None
    ) -> list[bool]:
        """Pages straight from the host pool at ``host_indices`` (one page per key)."""
        pool = self._pool()
        self._check_indices(keys, host_indices)
        pages = [pool.get_data_page(int(host_indices[i * self.page_size]), flat=True) for i in range(len(keys))]
        return self._write(keys, pages)

    def _write(self, keys: list[str], values: list[Any]) -> list[bool]:
        ns = self._ns()
        if len(values) != len(keys):
            raise InvalidInput(f"{len(keys)} keys but {len(values)} values")
        if not self.storage_config.is_storage_writer:
            return [True] * len(keys)  # an MLA replica: the writer rank stores the shared pages
        datas = [self._bytes_of(v) for v in values]
        try:
            stored = self.backend.put_many(ns, self._keys(ns, keys), datas)
        except (KVStoreError, OSError) as exc:
            if isinstance(exc, InvalidInput):
                raise
            log.warning("kvstore write failed: %s", exc)
            return [False] * len(keys)
        self.counts["sets"] += len(keys)
        self.counts["stored"] += sum(stored)
        return stored

    # -- the rest ---------------------------------------------------------------------
    def clear(self) -> None:
        if self.ns is not None:
            self.backend.clear(self.ns)

    def close(self) -> None:
        self.backend.close()

    def get_stats(self) -> Any:
        return None

    # -- helpers ----------------------------------------------------------------------
    def _ns(self) -> Namespace:
        if self.ns is None:
            raise InvalidInput("register_mem_pool_host must be called before reads and writes")
        return self.ns

    def _pool(self) -> Any:
        self._ns()
        return self.mem_pool_host

    def _keys(self, ns: Namespace, keys: Sequence[str]) -> list[ChunkKey]:
        if isinstance(keys, str) or not all(isinstance(k, str) and k for k in keys):
            raise InvalidInput("keys must be a list of non-empty strings")
        return engine_prefix_keys(ns, list(keys), self.page_size)

    def _blank(self) -> torch.Tensor:
        page: torch.Tensor = self._pool().get_dummy_flat_data_page()
        return page

    def _bytes_of(self, page: Any) -> torch.Tensor:
        """A page tensor as flat bytes (a view); it must be one whole page."""
        if not isinstance(page, torch.Tensor):
            raise InvalidInput(f"a page must be a torch tensor, got {type(page).__name__}")
        if not page.is_contiguous() or page.device.type != "cpu":
            raise InvalidInput("a page must be a contiguous CPU tensor")
        flat = page.reshape(-1).view(torch.uint8)
        if flat.numel() != self.page_bytes:
            raise InvalidInput(f"a page of {flat.numel()} bytes; this pool's pages hold {self.page_bytes}")
        return flat

    def _check_indices(self, keys: list[str], host_indices: torch.Tensor) -> None:
        if int(host_indices.numel()) != len(keys) * self.page_size:
            raise InvalidInput(f"{host_indices.numel()} host indices for {len(keys)} pages of {self.page_size}")


def _pos(value: object) -> int:
    return value if isinstance(value, int) and value > 0 else 0
