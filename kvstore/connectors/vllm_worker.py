"""The worker side of the vLLM connector: chunks in and out of vLLM's paged caches.

Loads run before the forward pass (vLLM calls ``start_load_kv`` first when a
step has synchronous loads) and saves after it (``wait_for_save``), so the
pages read are the ones this step computed. A chunk holds every layer of
this shard as ``[layers, 2, chunk_tokens, kv_heads, head_dim]``; layers are
ordered by their names with numbers compared as numbers, the same in every
process of the model.

Invariant: ``load_errors`` names exactly the blocks of the current step whose
load failed (a chunk missing, short or of the wrong size), and is emptied
when read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import torch

from kvstore.connectors.paged import PagedKVCache, PagedMover, gather, mover_for, scatter
from kvstore.connectors.vllm_backend import ChunkBackend, release_quietly
from kvstore.connectors.vllm_layout import detect_layout, kv_blocks_view
from kvstore.connectors.vllm_meta import KVStoreConnectorMetadata, LoadSpec, SaveSpec
from kvstore.connectors.vllm_settings import PagedLayout
from kvstore.connectors.vllm_spec import EngineGeometry, namespace_for
from kvstore.errors import DTypeMismatch, InvalidInput, KVStoreError, LeaseError, ShapeMismatch
from kvstore.keys import ChunkKey, Namespace, engine_prefix_keys
from kvstore.models.kv import torch_dtype

log = logging.getLogger(__name__)


def layer_order(name: str) -> list[tuple[int, int | str]]:
    """Sort key of a layer name: runs of digits compare as numbers."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p]


class WorkerSide:
    """Moves KV between vLLM's paged caches and the store for one engine shard."""

    def __init__(self, geometry: EngineGeometry, backend: ChunkBackend, layout: PagedLayout = "auto") -> None:
        self.geometry = geometry
        self.backend = backend
        self.layout = layout
        self.cache: PagedKVCache | None = None  # every layer, seen as (2, blocks, block size, heads, dim)
        self.layer_names: list[str] = []
        self._mover: PagedMover | None = None
        self._namespaces: dict[str, Namespace] = {}
        self.load_errors: set[int] = set()
        self.stats = {"chunks_loaded": 0, "chunks_failed": 0, "chunks_saved": 0, "chunks_rejected": 0}

    # -- registration -----------------------------------------------------------------
    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Take vLLM's per-layer caches and check them against the KV spec.

        Raises:
            ShapeMismatch, DTypeMismatch: the caches are not what the config says.
        """
        spec = self.geometry.spec
        names = sorted(kv_caches, key=layer_order)
        if len(names) != spec.num_layers:
            raise ShapeMismatch(f"{len(names)} KV cache layers registered; the model config says {spec.num_layers}")
        first = kv_caches[names[0]]
        layout = self.layout if self.layout != "auto" else detect_layout(first, spec.num_kv_heads, spec.head_dim)
        views = [kv_blocks_view(kv_caches[n], layout, spec.num_kv_heads, spec.head_dim) for n in names]
        want = torch_dtype(spec.dtype)
        for name, view in zip(names, views):
            if view.dtype != want:
                raise DTypeMismatch(f"layer {name} holds {view.dtype}; the namespace's dtype is {want}")
        cache = PagedKVCache.wrap(views, "vllm_flash_nhd")
        cache.check_spec(spec)
        kernel = cache.geometry.block_size  # vLLM may split its blocks into smaller kernel blocks
        if self.geometry.block_size % kernel:
            raise ShapeMismatch(f"kernel block size {kernel} does not divide vLLM's block size {self.geometry.block_size}")
        self.cache, self.layer_names, self._mover = cache, names, mover_for(cache.device)

    # -- loads ------------------------------------------------------------------------
    def start_load(self, meta: KVStoreConnectorMetadata) -> None:
        for spec in meta.loads:
            self._load(spec)

    def take_load_errors(self) -> set[int]:
        errors, self.load_errors = self.load_errors, set()
        return errors

    def _load(self, load: LoadSpec) -> None:
        g = self.geometry
        self._cache()
        try:
            ns = self._namespace(load.tenant)
        except (KVStoreError, OSError) as exc:
            if isinstance(exc, InvalidInput):
                raise
            log.warning("request %s: the store is unreachable (%s); %d blocks reported", load.req_id, exc,
                        len(load.block_ids))
            self.load_errors.update(load.block_ids)
            return
        keys = engine_prefix_keys(ns, list(load.block_hashes), g.block_size)
        lease = load.lease
        try:
            for i, key in enumerate(keys):
                chunk = load.first_chunk + i
                lo = max(load.start_token, chunk * g.chunk_tokens)
                hi = (chunk + 1) * g.chunk_tokens
                ids = load.block_ids[(lo - load.start_token) // g.block_size : (hi - load.start_token) // g.block_size]
                ok, lease = self._read_chunk(ns, key, lease, lo - chunk * g.chunk_tokens, ids)
                if ok:
                    self.stats["chunks_loaded"] += 1
                else:
                    self.stats["chunks_failed"] += 1
                    self.load_errors.update(ids)
                    log.warning("request %s: chunk %d could not be loaded; %d blocks reported", load.req_id, chunk,
                                len(ids))
        finally:
            release_quietly(self.backend, load.lease)

    def _read_chunk(
        self, ns: Namespace, key: ChunkKey, lease: int | None, offset: int, block_ids: Sequence[int]
    ) -> tuple[bool, int | None]:
        """Fetch one chunk and write its tokens ``[offset, ...)`` into ``block_ids``.

        Returns whether it was written, and the lease to use from now on: a
        lease that expired since the lookup is dropped and the chunk read
        without it (it may still be there).
        """
        spec, c = self.geometry.spec, self.geometry.chunk_tokens
        buf = torch.empty(spec.chunk_shape(c), dtype=torch_dtype(spec.dtype))
        try:
            try:
                got = self.backend.get_many(ns, [key], [buf], lease)[0]
            except LeaseError:
                lease = None
                got = self.backend.get_many(ns, [key], [buf], None)[0]
        except (KVStoreError, OSError) as exc:  # a remote outage or a refused read is a miss
            log.warning("chunk read failed: %s", exc)
            return False, lease
        if got != spec.chunk_nbytes(c):
            return False, lease
        cache = self._cache()
        slots = cache.block_table_slots(list(block_ids), 0, c - offset, block_size=self.geometry.block_size)
        scatter(cache, slots, buf[:, :, offset:].contiguous().to(cache.device), mover=self._mover)
        return True, lease

    # -- saves ------------------------------------------------------------------------
    def save(self, meta: KVStoreConnectorMetadata) -> None:
        for spec in meta.saves:
            self._save(spec)

    def _save(self, save: SaveSpec) -> None:
        g = self.geometry
        self._cache()
        per = g.blocks_per_chunk
        count = len(save.block_ids) // per
        try:
            ns = self._namespace(save.tenant)
            keys = engine_prefix_keys(ns, list(save.block_hashes), g.block_size)
            chunks = [self._gather_chunk(save.block_ids[i * per : (i + 1) * per]) for i in range(count)]
            stored = self.backend.put_many(ns, keys, chunks)
        except (KVStoreError, OSError) as exc:  # the store is unreachable: a future miss, not an engine failure
            if isinstance(exc, InvalidInput):
                raise
            log.warning("kvstore save failed: %s", exc)
            stored = [False] * count
        self.stats["chunks_saved"] += sum(stored)
        self.stats["chunks_rejected"] += len(stored) - sum(stored)

    def _gather_chunk(self, block_ids: Sequence[int]) -> torch.Tensor:
        cache = self._cache()
        slots = cache.block_table_slots(list(block_ids), block_size=self.geometry.block_size)
        return gather(cache, slots, mover=self._mover).cpu()

    # -- helpers ----------------------------------------------------------------------
    def _namespace(self, tenant: str) -> Namespace:
        ns = self._namespaces.get(tenant)
        if ns is None:
            ns = self._namespaces[tenant] = self.backend.register(namespace_for(self.geometry, tenant))
        return ns

    def _cache(self) -> PagedKVCache:
        if self.cache is None:
            raise InvalidInput("register_kv_caches must be called before loads and saves")
        return self.cache
