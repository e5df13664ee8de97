"""The scheduler side of the vLLM connector: lookups, load and save plans.

Field names are those of the pinned release (vLLM 0.33.0): a ``Request`` has
``request_id``, ``block_hashes`` (one chained hash per full block, growing as
tokens arrive), ``cache_salt``, ``num_tokens`` and ``num_prompt_tokens``; a
``SchedulerOutput`` has ``scheduled_new_reqs`` (``NewRequestData``: ``req_id``,
``block_ids`` per KV cache group, ``num_computed_tokens``),
``scheduled_cached_reqs`` (``CachedRequestData``: ``req_ids``,
``resumed_req_ids``, ``new_block_ids``, ``num_computed_tokens``) and
``num_scheduled_tokens``; ``update_state_after_alloc`` receives the request's
``KVCacheBlocks`` (``get_block_ids()``: one list per KV cache group).

Lookups ask every shard of the replica (each tensor rank keeps its own
chunks) and plan the prefix all of them hold; the lease each shard's lookup
took travels in the :class:`LoadSpec` to the worker of that shard. Saves cover
whole chunks as they are computed: prompt chunks, and with ``save_decode``
the chunks that generated tokens fill (a chunk whose last token was sampled
but never run through the model is not whole yet: its KV does not exist).
With ``async_load`` a load is planned as soon as its blocks are allocated
(vLLM does not schedule the request until the worker reports the load
finished).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvstore.connectors.vllm_backend import ChunkBackend, release_quietly
from kvstore.connectors.vllm_meta import KVStoreConnectorMetadata, LoadSpec, SaveSpec
from kvstore.connectors.vllm_spec import EngineGeometry, namespace_for
from kvstore.errors import InvalidInput, KVStoreError
from kvstore.keys import Namespace, NamespaceId, engine_prefix_keys

log = logging.getLogger(__name__)


@dataclass
class _PendingLoad:
    """A lookup's hit waiting for the scheduler's allocation (then for the next plan)."""

    hit_chunks: int
    leases: tuple[tuple[int, int, int | None], ...]  # (tp_rank, pp_rank, lease) of each shard
    start_token: int = -1  # set by update_state_after_alloc
    is_async: bool = False

    @property
    def confirmed(self) -> bool:
        return self.start_token >= 0


@dataclass
class _Tracker:
    """What the scheduler side knows of one live request.

    Invariant: chunks ``[0, saved_chunks)`` are in the store or planned to be
    saved; ``block_ids`` are the request's blocks (KV cache group 0) as of the
    last plan.
    """

    request: Any
    tenant: str
    saved_chunks: int = 0
    block_ids: list[int] | None = None
    load: _PendingLoad | None = None


class SchedulerSide:
    """Plans loads and saves for the worker side; owns the leases its lookups take."""

    def __init__(
        self, geometry: EngineGeometry, backend: ChunkBackend, default_tenant: str, lease_ttl_s: float, *,
        shards: Sequence[EngineGeometry] | None = None, save_decode: bool = True, async_load: bool = False,
    ) -> None:
        self.geometry = geometry
        self.backend = backend
        self.default_tenant = default_tenant
        self.lease_ttl_s = lease_ttl_s
        #: every shard of the replica whose chunks a hit needs (default: this one alone)
        self.shards: list[EngineGeometry] = list(shards) if shards else [geometry]
        self.save_decode = save_decode
        self.async_load = async_load
        self._namespaces: dict[tuple[str, int], Namespace] = {}
        self._trackers: dict[str, _Tracker] = {}

    # -- namespaces -------------------------------------------------------------------
    def tenant_of(self, request: Any) -> str:
        salt = getattr(request, "cache_salt", None)
        return str(salt) if salt else self.default_tenant

    def namespace(self, tenant: str, shard: int = 0) -> Namespace:
        """The tenant's namespace on ``self.shards[shard]``, registered with the backend on first use."""
        ns = self._namespaces.get((tenant, shard))
        if ns is None:
            ns = self.backend.register(namespace_for(self.shards[shard], tenant))
            self._namespaces[(tenant, shard)] = ns
        return ns

    def namespace_ids(self) -> set[NamespaceId]:
        return {ns.id for ns in self._namespaces.values()}

    # -- the scheduler's calls --------------------------------------------------------
    def matched_tokens(self, request: Any, num_computed_tokens: int) -> int:
        """Tokens beyond ``num_computed_tokens`` every shard can supply (whole chunks, never the last token)."""
        tracker = self._track(request)
        self._drop_load(tracker)
        c = self.geometry.chunk_tokens
        # vLLM must compute at least one token of the prompt itself
        hit_chunks = max(0, (int(request.num_tokens) - 1) // c)
        hashes = list(request.block_hashes)
        leases: list[tuple[int, int, int | None]] = []
        try:
            for i, shard in enumerate(self.shards):
                if hit_chunks == 0:
                    break
                ns = self.namespace(tracker.tenant, i)
                keys = engine_prefix_keys(ns, hashes, shard.block_size)[:hit_chunks]
                if not keys:
                    hit_chunks = 0
                    break
                hit = self.backend.lookup(ns, keys, lease=True, ttl_s=self.lease_ttl_s)
                leases.append((shard.spec.shard.tp_rank, shard.spec.shard.pp_rank, hit.lease))
                hit_chunks = min(hit_chunks, hit.chunks)
        except (KVStoreError, OSError) as exc:  # the store is unreachable: a miss, vLLM computes
            _release_all(self.backend, leases)
            if isinstance(exc, InvalidInput):
                raise
            log.warning("kvstore lookup failed: %s", exc)
            return 0
        tracker.saved_chunks = max(tracker.saved_chunks, hit_chunks)
        if hit_chunks * c <= num_computed_tokens:
            _release_all(self.backend, leases)
            return 0
        tracker.load = _PendingLoad(hit_chunks, tuple(leases))
        return hit_chunks * c - num_computed_tokens

    def after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """Confirm (or drop) the pending load once vLLM has allocated blocks for it.

        An asynchronous load takes its block ids from ``blocks`` (the request's
        ``KVCacheBlocks``): vLLM will not schedule the request until it is loaded.
        """
        tracker = self._track(request)
        load = tracker.load
        if num_external_tokens <= 0 or load is None:
            self._drop_load(tracker)
            return
        end = load.hit_chunks * self.geometry.chunk_tokens
        start = end - num_external_tokens
        if start < 0 or start % self.geometry.block_size:
            raise InvalidInput(f"cannot load {num_external_tokens} tokens ending at {end}: not block-aligned")
        load.start_token = start
        if self.async_load:
            if blocks is None or not hasattr(blocks, "get_block_ids"):
                raise InvalidInput("an asynchronous load needs the request's KVCacheBlocks")
            tracker.block_ids = _group0(blocks.get_block_ids())
            load.is_async = True

    def build_meta(self, scheduler_output: Any) -> KVStoreConnectorMetadata:
        """This step's plan; consumes the confirmed loads."""
        meta = KVStoreConnectorMetadata()
        for req_id, tracker in self._trackers.items():  # asynchronous loads: their requests wait, unscheduled
            load = tracker.load
            if load is not None and load.confirmed and load.is_async:
                meta.loads.append(self._load_spec(req_id, tracker, load))
                tracker.load = None  # the worker now owns the leases
        scheduled: dict[str, int] = dict(scheduler_output.num_scheduled_tokens)
        for new in scheduler_output.scheduled_new_reqs:
            self._plan(meta, new.req_id, _group0(new.block_ids), True, new.num_computed_tokens, scheduled)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            resumed = req_id in cached.resumed_req_ids
            new_ids = cached.new_block_ids[i]
            ids = _group0(new_ids) if new_ids is not None else []
            self._plan(meta, req_id, ids, resumed, cached.num_computed_tokens[i], scheduled)
        return meta

    def finished(self, request: Any) -> None:
        tracker = self._trackers.pop(str(request.request_id), None)
        if tracker is not None:
            self._drop_load(tracker)

    # -- helpers ----------------------------------------------------------------------
    def _track(self, request: Any) -> _Tracker:
        req_id = str(request.request_id)
        tracker = self._trackers.get(req_id)
        if tracker is None or tracker.request is not request:
            if tracker is not None:
                self._drop_load(tracker)
            tracker = self._trackers[req_id] = _Tracker(request, self.tenant_of(request))
        return tracker

    def _drop_load(self, tracker: _Tracker) -> None:
        if tracker.load is not None:
            _release_all(self.backend, tracker.load.leases)
            tracker.load = None

    def _plan(
        self, meta: KVStoreConnectorMetadata, req_id: str, block_ids: list[int], replace: bool,
        num_computed: int, scheduled: dict[str, int],
    ) -> None:
        tracker = self._trackers.get(req_id)
        if tracker is None:
            return  # never seen by this connector (e.g. admitted before it existed)
        if replace or tracker.block_ids is None:
            tracker.block_ids = list(block_ids)
        else:
            tracker.block_ids.extend(block_ids)
        load = tracker.load
        if load is not None and load.confirmed:
            meta.loads.append(self._load_spec(req_id, tracker, load))
            tracker.load = None  # the worker now owns the lease
        save = self._save_spec(req_id, tracker, num_computed + scheduled.get(req_id, 0))
        if save is not None:
            meta.saves.append(save)

    def _load_spec(self, req_id: str, tracker: _Tracker, load: _PendingLoad) -> LoadSpec:
        g = self.geometry
        per = g.blocks_per_chunk
        first = load.start_token // g.chunk_tokens
        end = load.hit_chunks * g.chunk_tokens
        hashes = tracker.request.block_hashes[first * per : load.hit_chunks * per]
        ids = (tracker.block_ids or [])[load.start_token // g.block_size : end // g.block_size]
        if len(ids) * g.block_size != end - load.start_token:
            raise InvalidInput(f"request {req_id} has {len(ids)} blocks for a load of {end - load.start_token} tokens")
        return LoadSpec(
            req_id, tracker.tenant, tuple(hashes), first, load.start_token, end, tuple(ids), load.leases, load.is_async
        )

    def _save_spec(self, req_id: str, tracker: _Tracker, done_tokens: int) -> SaveSpec | None:
        """Whole chunks that are computed once this step ends and not yet saved (prompt only without save_decode)."""
        g = self.geometry
        per = g.blocks_per_chunk
        request = tracker.request
        ids = tracker.block_ids or []
        if not self.save_decode:
            done_tokens = min(done_tokens, int(request.num_prompt_tokens))
        upto = min(
            done_tokens // g.chunk_tokens,
            len(request.block_hashes) // per,
            len(ids) // per,
        )
        first = tracker.saved_chunks
        if upto <= first:
            return None
        tracker.saved_chunks = upto
        hashes = request.block_hashes[first * per : upto * per]
        return SaveSpec(req_id, tracker.tenant, tuple(hashes), first, tuple(ids[first * per : upto * per]))


def _release_all(backend: ChunkBackend, leases: Sequence[tuple[int, int, int | None]]) -> None:
    for _, _, lease in leases:
        release_quietly(backend, lease)


def _group0(block_ids: Sequence[Sequence[int]]) -> list[int]:
    """Block ids of the one KV cache group this connector supports."""
    if len(block_ids) != 1:
        raise InvalidInput(
            f"{len(block_ids)} KV cache groups: the kvstore connector needs one "
            "(the hybrid KV cache manager is off for connectors without HMA support)"
        )
    return list(block_ids[0])
