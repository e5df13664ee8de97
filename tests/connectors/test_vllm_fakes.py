"""Stand-ins for the vLLM objects the connector sees, built to the pinned release's field names (0.33.0).

``FakeEngine`` drives a scheduler-side connector and one worker-side
connector per tensor-parallel rank the way vLLM's scheduler and model runners
do for one request at a time: lookup (``get_num_new_matched_tokens``),
block allocation (``update_state_after_alloc``), the step's plan
(``build_connector_meta``), then on the worker ``bind_connector_metadata``,
``start_load_kv``, the forward pass (here: writing each computed token's KV
into the paged caches), ``wait_for_save``, ``get_block_ids_with_load_errors``
and ``clear_connector_metadata``; finally ``request_finished``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvstore.connectors.vllm_compat import KVConnectorRole

MODULE_PATH = "kvstore.connectors.vllm"


class FakeModelConfig:
    """``head_dim`` is the latent dim (``kv_lora_rank + qk_rope_head_dim``) when ``use_mla``."""

    def __init__(self, layers: int = 3, kv_heads: int = 2, head_dim: int = 8, dtype: torch.dtype = torch.bfloat16,
                 model: str = "test/tiny-llama", revision: str | None = "r1", use_mla: bool = False) -> None:
        self.model, self.revision, self.dtype, self.use_mla = model, revision, dtype, use_mla
        self._layers, self._heads, self._dim = layers, (1 if use_mla else kv_heads), head_dim

    def get_num_layers(self, parallel_config: Any) -> int:
        return int(self._layers // parallel_config.pipeline_parallel_size)

    def get_num_kv_heads(self, parallel_config: Any) -> int:
        if self.use_mla:
            return 1
        return int(max(1, self._heads // parallel_config.tensor_parallel_size))

    def get_head_size(self) -> int:
        return self._dim


@dataclass
class FakeCacheConfig:
    block_size: int = 4
    cache_dtype: str = "auto"


@dataclass
class FakeParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    rank: int = 0


@dataclass
class FakeKVTransferConfig:
    kv_connector: str = "KVStoreConnector"
    kv_connector_module_path: str = MODULE_PATH
    kv_role: str = "kv_both"
    kv_connector_extra_config: dict[str, Any] = field(default_factory=dict)

    @property
    def is_kv_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")


@dataclass
class FakeVllmConfig:
    model_config: FakeModelConfig
    cache_config: FakeCacheConfig
    parallel_config: FakeParallelConfig
    kv_transfer_config: FakeKVTransferConfig | None


def make_config(extra: dict[str, Any] | None = None, block_size: int = 4, tp: int = 1, **model: Any) -> FakeVllmConfig:
    return FakeVllmConfig(FakeModelConfig(**model), FakeCacheConfig(block_size), FakeParallelConfig(tp),
                          FakeKVTransferConfig(kv_connector_extra_config=dict(extra or {})))


def rank_config(config: FakeVllmConfig, rank: int) -> FakeVllmConfig:
    """The config a worker process of ``rank`` sees (same model, its own parallel rank)."""
    return dataclasses.replace(config, parallel_config=dataclasses.replace(config.parallel_config, rank=rank))


class FakeKVCacheBlocks:
    """vLLM's ``KVCacheBlocks`` as the connector reads it: ``get_block_ids()``, one list per group."""

    def __init__(self, block_ids: list[int]) -> None:
        self._ids = list(block_ids)

    def get_block_ids(self, allow_none: bool = False) -> tuple[list[int], ...]:
        return (list(self._ids),)


def block_hashes(tokens: list[int], block_size: int, cache_salt: str | None = None) -> list[bytes]:
    """Chained 32-byte hashes of full blocks; the salt enters the first block, as in vLLM."""
    out: list[bytes] = []
    parent = b"\0" * 32
    for i in range(len(tokens) // block_size):
        h = hashlib.sha256(parent)
        h.update(repr(tokens[i * block_size : (i + 1) * block_size]).encode())
        if i == 0 and cache_salt is not None:
            h.update(cache_salt.encode())
        parent = h.digest()
        out.append(parent)
    return out


class FakeRequest:
    """vLLM's ``Request`` as the connector reads it."""

    def __init__(self, request_id: str, prompt: list[int], block_size: int, cache_salt: str | None = None) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt)
        self.cache_salt = cache_salt
        self.num_computed_tokens = 0
        self.output_token_ids: list[int] = []
        self._block_size = block_size
        self.block_hashes = block_hashes(self.prompt_token_ids, block_size, cache_salt)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def append_output(self, token: int) -> None:
        """A sampled token; like vLLM, a block filled by it gets its hash at once (its KV is computed later)."""
        self.output_token_ids.append(token)
        self.block_hashes = block_hashes(self.all_token_ids, self._block_size, self.cache_salt)


@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int] | None
    mm_features: list[Any]
    sampling_params: Any
    pooling_params: Any
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int
    lora_request: Any


@dataclass
class CachedRequestData:
    req_ids: list[str] = field(default_factory=list)
    resumed_req_ids: set[str] = field(default_factory=set)
    new_token_ids: list[list[int]] = field(default_factory=list)
    all_token_ids: dict[str, list[int]] = field(default_factory=dict)
    new_block_ids: list[tuple[list[int], ...] | None] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    num_output_tokens: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    scheduled_encoder_inputs: dict[str, list[int]] = field(default_factory=dict)
    finished_req_ids: set[str] = field(default_factory=set)
    free_encoder_mm_hashes: list[str] = field(default_factory=list)
    kv_connector_metadata: Any = None


def token_kv(token: int, pos: int, layer: int, heads: int, dim: int, dtype: torch.dtype, mla: bool = False) -> torch.Tensor:
    """Deterministic stand-in KV of one token: ``(2, heads, dim)``, or the ``(dim,)`` latent for MLA."""
    g = torch.Generator().manual_seed(token * 1_000_003 + pos * 7919 + layer)
    return torch.randn((dim,) if mla else (2, heads, dim), generator=g).to(dtype)


@dataclass
class StepResult:
    external_tokens: int
    load_errors: set[int]
    block_ids: list[int]


class FakeEngine:
    """One vLLM engine: a scheduler and ``tp`` workers, each with paged caches of ``num_blocks`` blocks per layer.

    The tensor-parallel size comes from the config; worker ``r`` holds kv heads
    ``[r * H / tp, (r + 1) * H / tp)`` (MLA: every worker the whole latent).
    ``worker`` and ``caches`` are rank 0's.
    """

    def __init__(self, connector_cls: type, config: FakeVllmConfig, num_blocks: int = 64, layout: str = "heads_tokens",
                 kernel_split: int = 1, device: str = "cpu", **connector_kwargs: Any) -> None:
        self.config = config
        m, bs = config.model_config, config.cache_config.block_size
        self.mla = bool(m.use_mla)
        self.tp = config.parallel_config.tensor_parallel_size
        self.layers, self.heads, self.dim, self.bs = m._layers, m._heads, m._dim, bs
        self.dtype = m.dtype
        self.scheduler = connector_cls(config, KVConnectorRole.SCHEDULER, None, **connector_kwargs)
        self.workers = [
            connector_cls(rank_config(config, r), KVConnectorRole.WORKER, None, **connector_kwargs)
            for r in range(self.tp)
        ]
        self.worker = self.workers[0]
        # vLLM may split each block into ``kernel_split`` kernel blocks (0.33: group_kernel_blocks)
        self.split = kernel_split
        nb, kbs = num_blocks * kernel_split, bs // kernel_split
        h = self.heads if self.mla else self.heads // self.tp
        layout = "mla" if self.mla else layout
        shape = {
            "heads_tokens": (nb, h, kbs, 2 * self.dim),
            "kv_blocks": (2, nb, kbs, h, self.dim),
            "blocks_kv": (nb, 2, kbs, h, self.dim),
            "mla": (nb, kbs, self.dim),
        }[layout]
        self.layout = layout
        self.rank_caches = [
            {f"model.layers.{i}.self_attn.attn": torch.zeros(shape, dtype=self.dtype, device=device)
             for i in range(self.layers)}
            for _ in range(self.tp)
        ]
        self.caches = self.rank_caches[0]
        for worker, caches in zip(self.workers, self.rank_caches):
            worker.register_kv_caches(caches)
        self.free = list(range(num_blocks))

    def _kernel(self, block: int, offset: int) -> tuple[int, int]:
        kbs = self.bs // self.split
        return block * self.split + offset // kbs, offset % kbs

    def _slot(self, c: torch.Tensor, block: int, offset: int) -> torch.Tensor:
        if self.layout == "heads_tokens":
            return c[block, :, offset].view(-1, 2, self.dim).transpose(0, 1)
        if self.layout == "kv_blocks":
            return c[:, block, offset]
        return c[block, :, offset] if self.layout == "blocks_kv" else c[block, offset]

    def slot_kv(self, layer: int, block: int, offset: int, rank: int | None = None) -> torch.Tensor:
        """The ``(2, heads, dim)`` KV (MLA: ``(dim,)``) stored at one slot, whatever the layout.

        ``rank`` None: every rank's heads together (MLA: rank 0's latent).
        """
        block, offset = self._kernel(block, offset)
        name = f"model.layers.{layer}.self_attn.attn"
        if rank is not None or self.mla:
            return self._slot(self.rank_caches[rank or 0][name], block, offset)
        return torch.cat([self._slot(c[name], block, offset) for c in self.rank_caches], dim=1)

    def write_slot(self, layer: int, block: int, offset: int, kv: torch.Tensor) -> None:
        block, offset = self._kernel(block, offset)
        h = self.heads // self.tp
        for r, caches in enumerate(self.rank_caches):
            c = caches[f"model.layers.{layer}.self_attn.attn"]
            part = kv if self.mla else kv[:, r * h : (r + 1) * h]
            part = part.to(c.device)
            if self.layout == "heads_tokens":
                c[block, :, offset] = part.transpose(0, 1).flatten(-2)
            elif self.layout == "kv_blocks":
                c[:, block, offset] = part
            elif self.layout == "blocks_kv":
                c[block, :, offset] = part
            else:
                c[block, offset] = part

    def kv_of(self, token: int, pos: int, layer: int) -> torch.Tensor:
        return token_kv(token, pos, layer, self.heads, self.dim, self.dtype, self.mla)

    def forward(self, request: Any, block_ids: list[int], start: int, end: int) -> None:
        """The model's forward pass over positions ``[start, end)``: their KV lands in the pages."""
        for pos in range(start, end):
            tok = request.all_token_ids[pos]
            for layer in range(self.layers):
                self.write_slot(layer, block_ids[pos // self.bs], pos % self.bs, self.kv_of(tok, pos, layer))

    def worker_step(self, meta: Any, forward: Callable[[], None] | None = None) -> set[int]:
        """Every worker: bind, load, (forward), save, collect load errors, clear."""
        for w in self.workers:
            w.bind_connector_metadata(meta)
            w.start_load_kv(None)
        if forward is not None:
            forward()
        errors: set[int] = set()
        for w in self.workers:
            w.wait_for_save()
            errors |= w.get_block_ids_with_load_errors()
            w.clear_connector_metadata()
        return errors

    def run_prefill(self, request: Any, local_computed: int = 0, forward: bool = True) -> StepResult:
        """Admit ``request`` and run its whole prefill in one step (the step's output from :meth:`make_output`)."""
        ext, is_async = self.scheduler.get_num_new_matched_tokens(request, local_computed)
        assert is_async is False
        n_blocks = -(-request.num_tokens // self.bs)
        block_ids = [self.free.pop(0) for _ in range(n_blocks)]
        self.scheduler.update_state_after_alloc(request, FakeKVCacheBlocks(block_ids), ext)
        computed = local_computed + ext
        request.num_computed_tokens = computed
        out = self.make_output(request, block_ids, computed, request.num_tokens - computed)
        out.kv_connector_metadata = self.scheduler.build_connector_meta(out)
        errors = self.worker_step(
            out.kv_connector_metadata,
            (lambda: self.forward(request, block_ids, computed, request.num_tokens)) if forward else None,
        )
        request.num_computed_tokens = request.num_tokens
        return StepResult(ext, errors, block_ids)

    @staticmethod
    def make_output(request: Any, block_ids: list[int], computed: int, scheduled: int) -> Any:
        """A step that schedules ``request`` for the first time."""
        new = NewRequestData(request.request_id, request.prompt_token_ids, [], None, None, (block_ids,), computed, None)
        return SchedulerOutput([new], CachedRequestData(), {request.request_id: scheduled}, scheduled)

    @staticmethod
    def cached_output(request: Any, new_block_ids: list[int], computed: int, scheduled: int) -> Any:
        """A later step of a running request (decode, or the next part of a chunked prefill)."""
        rid = request.request_id
        cached = CachedRequestData([rid], set(), [[]], {}, [(new_block_ids,)], [computed], [len(request.output_token_ids)])
        return SchedulerOutput([], cached, {rid: scheduled}, scheduled)

    def finish(self, request: Any, block_ids: list[int]) -> None:
        delay, params = self.scheduler.request_finished(request, block_ids)
        assert delay is False and params is None

    def token_matches(self, request: Any, block_ids: list[int], pos: int) -> bool:
        tok = request.all_token_ids[pos]
        return all(
            torch.equal(self.slot_kv(layer, block_ids[pos // self.bs], pos % self.bs).cpu(), self.kv_of(tok, pos, layer))
            for layer in range(self.layers)
        )

    def close(self) -> None:
        self.scheduler.shutdown()
        for w in self.workers:
            w.shutdown()


def test_fake_request_hashes_chain_and_salt() -> None:
    a = FakeRequest("a", list(range(10)), 4)
    b = FakeRequest("b", list(range(10)), 4, cache_salt="x")
    assert len(a.block_hashes) == 2 and all(len(h) == 32 for h in a.block_hashes)
    assert a.block_hashes[0] != b.block_hashes[0] and a.block_hashes[1] != b.block_hashes[1]


def test_fake_engine_slots_round_trip_every_layout() -> None:
    for layout in ("heads_tokens", "kv_blocks", "blocks_kv"):
        class _Null:  # a connector that does nothing, to exercise the engine's own slot helpers
            def __init__(self, *a: Any) -> None: ...
            def register_kv_caches(self, caches: Any) -> None: ...
        eng = FakeEngine(_Null, make_config(), num_blocks=4, layout=layout)
        kv = token_kv(5, 1, 0, eng.heads, eng.dim, eng.dtype)
        eng.write_slot(0, 2, 3, kv)
        assert torch.equal(eng.slot_kv(0, 2, 3), kv)
