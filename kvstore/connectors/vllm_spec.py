"""The KV spec and namespaces of a vLLM engine, from its ``VllmConfig``.

The scheduler-side and worker-side connectors derive the spec with the same
function from the same config, so their namespaces (and keys) agree by
construction; the worker then checks the caches vLLM registers against it.
Field names are those of the pinned release (vLLM 0.33.0): ``model_config``
(``model``, ``revision``, ``dtype``, ``use_mla``, ``get_num_layers``,
``get_num_kv_heads``, ``get_head_size``), ``cache_config`` (``block_size``,
``cache_dtype``) and ``parallel_config`` (``tensor_parallel_size``,
``pipeline_parallel_size``, ``rank``: DP x PP x TP order).

Every tensor-parallel rank holds its own slice of the kv heads, so each rank
stores and loads its own chunks under its own namespace (the shard is part of
the spec). MLA caches one latent vector per token, the same on every tensor
rank: its namespace names one shard for all of them (``tp_size`` 1), tensor
rank 0 writes it and every rank reads it. The scheduler looks a prefix up in
the namespace of every shard of its replica (:func:`shard_geometries`) and
plans only what all of them hold.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from kvstore.errors import InvalidInput
from kvstore.keys import Namespace
from kvstore.spec import DType, KVSpec, ModelFingerprint, Shard

#: vLLM ``cache_dtype`` values with a kvstore dtype ("auto" follows the model's dtype)
_CACHE_DTYPES: dict[str, DType] = {
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "float32": "float32",
    "float": "float32",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}


@dataclass(frozen=True, slots=True)
class EngineGeometry:
    """What the connectors need to know of the engine beyond the KV spec."""

    spec: KVSpec
    block_size: int
    chunk_tokens: int
    #: this rank stores chunks (False for the MLA replicas of tensor ranks other than 0)
    writer: bool = True

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_tokens // self.block_size


def _dtype_name(value: object) -> str:
    """A dtype as vLLM holds it (a torch dtype or a string) -> its plain name."""
    return str(value).removeprefix("torch.")


def kv_dtype(model_dtype: object, cache_dtype: object) -> DType:
    """The kvstore dtype of vLLM's KV cache.

    Raises:
        InvalidInput: a cache dtype kvstore cannot store (packed or quantized formats).
    """
    name = _dtype_name(cache_dtype)
    if name == "auto":
        name = _dtype_name(model_dtype)
    try:
        return _CACHE_DTYPES[name]
    except KeyError:
        raise InvalidInput(f"KV cache dtype {name!r} is not supported; one of {sorted(_CACHE_DTYPES)}") from None


def engine_geometry(
    vllm_config: Any, chunk_tokens: int, revision: str | None, rank: int | None = None
) -> EngineGeometry:
    """Spec, block size and chunk size of the engine shard at ``rank`` (default ``parallel_config.rank``).

    Raises:
        InvalidInput: an unsupported cache dtype, or ``chunk_tokens`` that is not a multiple of
            the block size.
    """
    model, cache, par = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    if rank is not None and rank != int(par.rank):
        par = copy.copy(par)  # the model config reads this rank's pipeline stage from it
        par.rank = rank
    block_size = int(cache.block_size)
    if block_size < 1 or chunk_tokens % block_size:
        raise InvalidInput(f"chunk_tokens {chunk_tokens} must be a multiple of vLLM's block size {block_size}")
    tp, pp = int(par.tensor_parallel_size), int(par.pipeline_parallel_size)
    r = int(par.rank)
    mla = bool(getattr(model, "use_mla", False))
    tp_rank = r % tp
    if mla:  # one latent per token, replicated on every tensor rank: one shard for all of them
        shard = Shard(tp_rank=0, tp_size=1, pp_rank=(r // tp) % pp, pp_size=pp)
    else:
        shard = Shard(tp_rank=tp_rank, tp_size=tp, pp_rank=(r // tp) % pp, pp_size=pp)
    spec = KVSpec(
        model=ModelFingerprint(str(model.model), revision if revision is not None else str(model.revision or "")),
        num_layers=int(model.get_num_layers(par)),
        num_kv_heads=1 if mla else int(model.get_num_kv_heads(par)),
        head_dim=int(model.get_head_size()),
        dtype=kv_dtype(model.dtype, cache.cache_dtype),
        layout="mla_latent" if mla else "kv_separate",
        shard=shard,
    )
    return EngineGeometry(spec, block_size, chunk_tokens, writer=not mla or tp_rank == 0)


def shard_geometries(vllm_config: Any, chunk_tokens: int, revision: str | None) -> list[EngineGeometry]:
    """The geometry of every distinct shard of this data-parallel replica (tensor x pipeline ranks).

    MLA shards of one pipeline stage are one (every tensor rank reads the same chunks).
    """
    par = vllm_config.parallel_config
    world = int(par.tensor_parallel_size) * int(par.pipeline_parallel_size)
    base = int(par.rank) // world * world
    out: list[EngineGeometry] = []
    for r in range(base, base + world):
        g = engine_geometry(vllm_config, chunk_tokens, revision, rank=r)
        if all(o.spec != g.spec for o in out):
            out.append(g)
    return out


def namespace_for(geometry: EngineGeometry, tenant: str) -> Namespace:
    """The namespace of ``tenant``'s chunks on this engine shard (scheme ``vllm``)."""
    return Namespace(tenant=tenant, spec=geometry.spec, scheme="vllm", chunk_tokens=geometry.chunk_tokens)
