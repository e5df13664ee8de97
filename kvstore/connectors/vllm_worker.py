"""The worker side of the vLLM connector: chunks in and out of vLLM's paged caches.

Synchronous loads run before the forward pass (vLLM calls ``start_load_kv``
first when a step has loads) and saves after it (``wait_for_save``), so the
pages read are the ones this step computed. Asynchronous loads run on one
background thread, into blocks of requests vLLM keeps waiting until
``get_finished`` names them. A chunk holds every layer of this shard as
``[layers, 2, chunk_tokens, kv_heads, head_dim]`` (MLA: ``[layers,
chunk_tokens, latent_dim]``); layers are ordered by their names with numbers
compared as numbers, the same in every process of the model.

Invariant: ``load_errors`` names exactly the blocks whose load failed (a
chunk missing, short or of the wrong size) since it was last read, and is
emptied when read; a request whose asynchronous load has ended is reported
by :meth:`WorkerSide.finished_loads` exactly once, failed or not.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

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
        self._lock = threading.Lock()  # load_errors, stats and namespaces, shared with the loader thread
        self._loader: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future[set[int]]] = {}

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
        if spec.layout == "mla_latent":
            views, paged = [kv_caches[n] for n in names], "mla"  # (blocks, block size, latent dim)
            for name, view in zip(names, views):
                if view.dim() != 3:
                    raise ShapeMismatch(
                        f"MLA layer {name} has shape {tuple(view.shape)}; wants (blocks, block_size, {spec.head_dim})"
                    )
        else:
            first = kv_caches[names[0]]
            layout = self.layout if self.layout != "auto" else detect_layout(first, spec.num_kv_heads, spec.head_dim)
            views = [kv_blocks_view(kv_caches[n], layout, spec.num_kv_heads, spec.head_dim) for n in names]
            paged = "vllm_flash_nhd"
        want = torch_dtype(spec.dtype)
        for name, view in zip(names, views):
            if view.dtype != want:
                raise DTypeMismatch(f"layer {name} holds {view.dtype}; the namespace's dtype is {want}")
        cache = PagedKVCache.wrap(views, paged)
        cache.check_spec(spec)
        kernel = cache.geometry.block_size  # vLLM may split its blocks into smaller kernel blocks
        if self.geometry.block_size % kernel:
            raise ShapeMismatch(f"kernel block size {kernel} does not divide vLLM's block size {self.geometry.block_size}")
        self.cache, self.layer_names, self._mover = cache, names, mover_for(cache.device)

    # -- loads ------------------------------------------------------------------------
    def start_load(self, meta: KVStoreConnectorMetadata) -> None:
        """Run the step's synchronous loads; hand its asynchronous ones to the loader thread."""
        for spec in meta.loads:
            if spec.is_async:
                self._cache()
                if self._loader is None:
                    self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-vllm-load")
                self._pending[spec.req_id] = self._loader.submit(self._load_async, spec)
            else:
                self._load(spec)

    def finished_loads(self) -> set[str]:
        """Requests whose asynchronous load has ended since the last call.

        Their failed blocks join ``load_errors`` now, so they are reported with the request.
        """
        done = {req_id for req_id, fut in self._pending.items() if fut.done()}
        for req_id in done:
            failed = self._pending.pop(req_id).result()
            with self._lock:
                self.load_errors.update(failed)
        return done

    def take_load_errors(self) -> set[int]:
        with self._lock:
            errors, self.load_errors = self.load_errors, set()
        return errors

    def close(self) -> None:
        """Wait for the asynchronous loads in flight and stop the loader thread."""
        if self._loader is not None:
            self._loader.shutdown(wait=True)
            self._loader = None

    def _load_async(self, load: LoadSpec) -> set[int]:
        """Run one load on the loader thread; returns the blocks that failed."""
        failed: set[int] = set()
        try:
            self._load(load, failed)
        except Exception:  # the thread must not lose a request: report its blocks, vLLM recomputes
            log.exception("request %s: asynchronous load failed", load.req_id)
            failed.update(load.block_ids)
        return failed

    def _failed(self, block_ids: Sequence[int], sink: set[int] | None) -> None:
        with self._lock:
            (self.load_errors if sink is None else sink).update(block_ids)
            self.stats["chunks_failed"] += 1

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _load(self, load: LoadSpec, sink: set[int] | None = None) -> None:
        """Read the chunks of ``load`` into its blocks; failed blocks go to ``sink`` (default ``load_errors``)."""
        g = self.geometry
        self._cache()
        shard = g.spec.shard
        lease = load.lease_of(shard.tp_rank, shard.pp_rank)
        own = lease
        try:
            try:
                ns = self._namespace(load.tenant)
            except (KVStoreError, OSError) as exc:
                if isinstance(exc, InvalidInput):
                    raise
                log.warning("request %s: the store is unreachable (%s); %d blocks reported", load.req_id, exc,
                            len(load.block_ids))
                with self._lock:
                    (self.load_errors if sink is None else sink).update(load.block_ids)
                return
            keys = engine_prefix_keys(ns, list(load.block_hashes), g.block_size)
            for i, key in enumerate(keys):
                chunk = load.first_chunk + i
                lo = max(load.start_token, chunk * g.chunk_tokens)
                hi = (chunk + 1) * g.chunk_tokens
                ids = load.block_ids[(lo - load.start_token) // g.block_size : (hi - load.start_token) // g.block_size]
                ok, lease = self._read_chunk(ns, key, lease, lo - chunk * g.chunk_tokens, ids)
                if ok:
                    self._count("chunks_loaded")
                else:
                    self._failed(ids, sink)
                    log.warning("request %s: chunk %d could not be loaded; %d blocks reported", load.req_id, chunk,
                                len(ids))
        finally:
            release_quietly(self.backend, own)

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
        token_axis = 1 if spec.layout == "mla_latent" else 2
        part = buf.narrow(token_axis, offset, c - offset) if offset else buf
        scatter(cache, slots, part.contiguous().to(cache.device), mover=self._mover)
        return True, lease

    # -- saves ------------------------------------------------------------------------
    def save(self, meta: KVStoreConnectorMetadata) -> None:
        """Store the step's whole chunks (an MLA replica that is not tensor rank 0 stores nothing)."""
        if not self.geometry.writer:
            return
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
        with self._lock:
            self.stats["chunks_saved"] += sum(stored)
            self.stats["chunks_rejected"] += len(stored) - sum(stored)

    def _gather_chunk(self, block_ids: Sequence[int]) -> torch.Tensor:
        cache = self._cache()
        slots = cache.block_table_slots(list(block_ids), block_size=self.geometry.block_size)
        return gather(cache, slots, mover=self._mover).cpu()

    # -- helpers ----------------------------------------------------------------------
    def _namespace(self, tenant: str) -> Namespace:
        with self._lock:
            ns = self._namespaces.get(tenant)
        if ns is None:
            ns = self.backend.register(namespace_for(self.geometry, tenant))
            with self._lock:
                self._namespaces[tenant] = ns
        return ns

    def _cache(self) -> PagedKVCache:
        if self.cache is None:
            raise InvalidInput("register_kv_caches must be called before loads and saves")
        return self.cache
