"""kvstore as a vLLM v1 KV connector (pinned release: vLLM 0.33.0).

Load it with::

    --kv-transfer-config '{"kv_connector": "KVStoreConnector",
                           "kv_connector_module_path": "kvstore.connectors.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"backend": "daemon", "url": "unix:///run/kvstore.sock"}}'

vLLM imports ``kv_connector_module_path`` and takes the class named
``kv_connector`` from it, then builds one object in the scheduler process
(role SCHEDULER) and one per worker (role WORKER), each with
``(vllm_config, role, kv_cache_config)``. The extra config is parsed into
:class:`~kvstore.connectors.vllm_settings.AdapterSettings` (docs/engines.md).

Keys are vLLM's own block hashes (``request.block_hashes``) wrapped per chunk
under scheme ``vllm`` (docs/keys.md); the tenant is the request's
``cache_salt`` (``default_tenant`` without one); every tensor/pipeline shard
keeps its own chunks (MLA: one copy for all tensor ranks). The scheduler side
plans loads of what every shard holds and saves of whole chunks (prompt and,
with ``save_decode``, generated tokens); the worker side runs loads before the
forward pass (or, with ``async_load``, on a background thread, reported through
``get_finished``) and reports the blocks of any chunk that could not be read
through ``get_block_ids_with_load_errors``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from kvstore.connectors.vllm_backend import ChunkBackend, open_backend
from kvstore.connectors.vllm_compat import HAVE_VLLM, KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole
from kvstore.connectors.vllm_events import convert, to_vllm_structs
from kvstore.connectors.vllm_meta import KVStoreConnectorMetadata
from kvstore.connectors.vllm_scheduler import SchedulerSide
from kvstore.connectors.vllm_settings import AdapterSettings
from kvstore.connectors.vllm_spec import engine_geometry, shard_geometries
from kvstore.connectors.vllm_worker import WorkerSide
from kvstore.errors import InvalidInput
from kvstore.keys import NamespaceId

__all__ = ["KVStoreConnector", "KVStoreConnectorMetadata"]


class KVStoreConnector(KVConnectorBase_V1):
    """The connector vLLM loads; its role decides which half is live.

    Invariant: a SCHEDULER object has ``scheduler`` and no ``worker``, a
    WORKER object the reverse; calling the other role's methods raises.
    """

    def __init__(
        self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None, *,
        backend: ChunkBackend | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = getattr(self._kv_transfer_config, "kv_connector_extra_config", None) or {}
        self.settings = AdapterSettings.from_mapping(extra)
        self.geometry = engine_geometry(vllm_config, self.settings.chunk_tokens, self.settings.model_revision)
        self.backend = backend if backend is not None else open_backend(self.settings)
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            shards = shard_geometries(vllm_config, self.settings.chunk_tokens, self.settings.model_revision)
            self.scheduler = SchedulerSide(
                self.geometry, self.backend, self.settings.default_tenant, self.settings.lease_ttl_s,
                shards=shards, save_decode=self.settings.save_decode, async_load=self.settings.async_load,
            )
        else:
            self.worker = WorkerSide(self.geometry, self.backend, self.settings.paged_layout)

    # -- scheduler side ---------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens the store adds to vLLM's own hit, and whether they load asynchronously (``async_load``)."""
        tokens = self._sched().matched_tokens(request, num_computed_tokens)
        return tokens, self.settings.async_load and tokens > 0

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._sched().after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return self._sched().build_meta(scheduler_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._sched().finished(request)
        return False, None  # saves finish within the step, so vLLM may free the blocks now

    def take_events(self) -> Iterable[Any]:
        """Store events of this engine's namespaces since the last call, as vLLM KV events."""
        sched = self._sched()
        ids = sched.namespace_ids()
        events = convert(self.backend.drain_events(), self._chunk_tokens_of, ids)
        return to_vllm_structs(events) if HAVE_VLLM else events

    def _chunk_tokens_of(self, ns_id: NamespaceId) -> int | None:
        ns = self.backend.namespace(ns_id)
        return ns.chunk_tokens if ns is not None else None

    # -- worker side ------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._work().register(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._meta()
        if meta is not None:
            self._work().start_load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # synchronous loads complete inside start_load_kv; asynchronous ones are reported by get_finished

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # chunks span every layer: they are gathered once the step is done (wait_for_save)

    def wait_for_save(self) -> None:
        meta = self._meta()
        if meta is not None:
            self._work().save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """``(None, requests whose asynchronous load ended)``: saves never outlive their step."""
        loaded = self._work().finished_loads()
        return None, (loaded or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._work().take_load_errors()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
        self.backend.close()

    # -- helpers ----------------------------------------------------------------------
    def _meta(self) -> KVStoreConnectorMetadata | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVStoreConnectorMetadata):
            raise InvalidInput(f"expected KVStoreConnectorMetadata, got {type(meta).__name__}")
        return meta

    def _sched(self) -> SchedulerSide:
        if self.scheduler is None:
            raise InvalidInput("a scheduler-side method was called on the worker-side connector")
        return self.scheduler

    def _work(self) -> WorkerSide:
        if self.worker is None:
            raise InvalidInput("a worker-side method was called on the scheduler-side connector")
        return self.worker
