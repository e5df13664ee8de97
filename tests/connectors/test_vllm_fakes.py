"""Stand-ins for the vLLM objects the connector sees, built to the pinned release's field names (0.33.0).

``FakeEngine`` drives a connector pair the way vLLM's scheduler and model
runner do for one request at a time: lookup (``get_num_new_matched_tokens``),
block allocation (``update_state_after_alloc``), the step's plan
(``build_connector_meta``), then on the worker ``bind_connector_metadata``,
``start_load_kv``, the forward pass (here: writing each computed token's KV
into the paged caches), ``wait_for_save``, ``get_block_ids_with_load_errors``
and ``clear_connector_metadata``; finally ``request_finished``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from kvstore.connectors.vllm_compat import KVConnectorRole

MODULE_PATH = "kvstore.connectors.vllm"


class FakeModelConfig:
    def __init__(self, layers: int = 3, kv_heads: int = 2, head_dim: int = 8, dtype: torch.dtype = torch.bfloat16,
                 model: str = "test/tiny-llama", revision: str | None = "r1") -> None:
        self.model, self.revision, self.dtype, self.use_mla = model, revision, dtype, False
        self._layers, self._heads, self._dim = layers, kv_heads, head_dim

    def get_num_layers(self, parallel_config: Any) -> int:
        return self._layers // parallel_config.pipeline_parallel_size

    def get_num_kv_heads(self, parallel_config: Any) -> int:
        return max(1, self._heads // parallel_config.tensor_parallel_size)

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


def make_config(extra: dict[str, Any] | None = None, block_size: int = 4, **model: Any) -> FakeVllmConfig:
    return FakeVllmConfig(FakeModelConfig(**model), FakeCacheConfig(block_size), FakeParallelConfig(),
                          FakeKVTransferConfig(kv_connector_extra_config=dict(extra or {})))


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
        self.block_hashes = block_hashes(self.prompt_token_ids, block_size, cache_salt)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


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


def token_kv(token: int, pos: int, layer: int, heads: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Deterministic stand-in KV of one token: ``(2, heads, dim)``."""
    g = torch.Generator().manual_seed(token * 1_000_003 + pos * 7919 + layer)
    return torch.randn(2, heads, dim, generator=g).to(dtype)


@dataclass
class StepResult:
    external_tokens: int
    load_errors: set[int]
    block_ids: list[int]


class FakeEngine:
    """One vLLM engine (scheduler + one worker) with paged caches of ``num_blocks`` blocks per layer."""

    def __init__(self, connector_cls: type, config: FakeVllmConfig, num_blocks: int = 64, layout: str = "heads_tokens",
                 kernel_split: int = 1, device: str = "cpu", **connector_kwargs: Any) -> None:
        self.config = config
        m, bs = config.model_config, config.cache_config.block_size
        self.layers, self.heads, self.dim, self.bs = m._layers, m._heads, m._dim, bs
        self.dtype = m.dtype
        self.scheduler = connector_cls(config, KVConnectorRole.SCHEDULER, None, **connector_kwargs)
        self.worker = connector_cls(config, KVConnectorRole.WORKER, None, **connector_kwargs)
        # vLLM may split each block into ``kernel_split`` kernel blocks (0.33: group_kernel_blocks)
        self.split = kernel_split
        nb, kbs = num_blocks * kernel_split, bs // kernel_split
        shape = {
            "heads_tokens": (nb, self.heads, kbs, 2 * self.dim),
            "kv_blocks": (2, nb, kbs, self.heads, self.dim),
            "blocks_kv": (nb, 2, kbs, self.heads, self.dim),
        }[layout]
        self.layout = layout
        self.caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(shape, dtype=self.dtype, device=device)
                       for i in range(self.layers)}
        self.worker.register_kv_caches(self.caches)
        self.free = list(range(num_blocks))

    def _kernel(self, block: int, offset: int) -> tuple[int, int]:
        kbs = self.bs // self.split
        return block * self.split + offset // kbs, offset % kbs

    def slot_kv(self, layer: int, block: int, offset: int) -> torch.Tensor:
        """The ``(2, heads, dim)`` KV stored at one slot, whatever the layout."""
        block, offset = self._kernel(block, offset)
        c = self.caches[f"model.layers.{layer}.self_attn.attn"]
        if self.layout == "heads_tokens":
            return c[block, :, offset].unflatten(-1, (2, self.dim)).transpose(0, 1)
        if self.layout == "kv_blocks":
            return c[:, block, offset]
        return c[block, :, offset]

    def write_slot(self, layer: int, block: int, offset: int, kv: torch.Tensor) -> None:
        block, offset = self._kernel(block, offset)
        c = self.caches[f"model.layers.{layer}.self_attn.attn"]
        kv = kv.to(c.device)
        if self.layout == "heads_tokens":
            c[block, :, offset] = kv.transpose(0, 1).flatten(-2)
        elif self.layout == "kv_blocks":
            c[:, block, offset] = kv
        else:
            c[block, :, offset] = kv

    def run_prefill(self, request: Any, local_computed: int = 0, forward: bool = True) -> StepResult:
        """Admit ``request`` and run its whole prefill in one step (the step's output from :meth:`make_output`)."""
        ext, is_async = self.scheduler.get_num_new_matched_tokens(request, local_computed)
        assert is_async is False
        n_blocks = -(-request.num_tokens // self.bs)
        block_ids = [self.free.pop(0) for _ in range(n_blocks)]
        self.scheduler.update_state_after_alloc(request, None, ext)
        computed = local_computed + ext
        request.num_computed_tokens = computed
        out = self.make_output(request, block_ids, computed, request.num_tokens - computed)
        out.kv_connector_metadata = self.scheduler.build_connector_meta(out)
        self.worker.bind_connector_metadata(out.kv_connector_metadata)
        self.worker.start_load_kv(None)
        if forward:
            for pos in range(computed, request.num_tokens):
                tok = request.prompt_token_ids[pos]
                for layer in range(self.layers):
                    kv = token_kv(tok, pos, layer, self.heads, self.dim, self.dtype)
                    self.write_slot(layer, block_ids[pos // self.bs], pos % self.bs, kv)
        self.worker.wait_for_save()
        errors = self.worker.get_block_ids_with_load_errors()
        self.worker.clear_connector_metadata()
        return StepResult(ext, errors, block_ids)

    @staticmethod
    def make_output(request: Any, block_ids: list[int], computed: int, scheduled: int) -> Any:
        """A step that schedules ``request`` for the first time."""
        new = NewRequestData(request.request_id, request.prompt_token_ids, [], None, None, (block_ids,), computed, None)
        return SchedulerOutput([new], CachedRequestData(), {request.request_id: scheduled}, scheduled)

    def finish(self, request: Any, block_ids: list[int]) -> None:
        delay, params = self.scheduler.request_finished(request, block_ids)
        assert delay is False and params is None

    def token_matches(self, request: Any, block_ids: list[int], pos: int) -> bool:
        tok = request.prompt_token_ids[pos]
        return all(
            torch.equal(self.slot_kv(layer, block_ids[pos // self.bs], pos % self.bs).cpu(),
                        token_kv(tok, pos, layer, self.heads, self.dim, self.dtype))
            for layer in range(self.layers)
        )

    def close(self) -> None:
        self.scheduler.shutdown()
        self.worker.shutdown()


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
