"""Move KV between a transformers ``DynamicCache`` and kvstore's chunk layout.

transformers 5.x keeps one ``DynamicLayer`` per decoder layer in
``cache.layers``; each holds ``keys`` and ``values`` of shape
``[batch, kv_heads, tokens, head_dim]``. kvstore stores a run of tokens as one
C-contiguous tensor ``[layers, 2, tokens, kv_heads, head_dim]`` (K at index 0,
V at 1; ``KVSpec.chunk_shape``). Converting is a transpose of the middle two
axes per layer and K/V; values are copied exactly except for the dtype cast
asked for.

Only full-attention layers are supported: a sliding-window layer drops old
tokens, so a token range would not mean the same positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from kvstore.errors import DTypeMismatch, InvalidInput, ShapeMismatch
from kvstore.spec import DType, KVSpec, ModelFingerprint

if TYPE_CHECKING:
    from transformers import DynamicCache, PretrainedConfig

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
}


def torch_dtype(dtype: DType) -> torch.dtype:
    """The torch dtype of a KV spec dtype name."""
    try:
        return TORCH_DTYPES[dtype]
    except KeyError:
        raise InvalidInput(f"unknown dtype {dtype!r}; one of {sorted(TORCH_DTYPES)}") from None


def spec_from_config(config: PretrainedConfig, model: ModelFingerprint, dtype: DType) -> KVSpec:
    """KV spec of a decoder-only model from its HF config (Llama-style fields).

    Raises:
        InvalidInput: the config lacks layer / head counts.
    """
    text = config.get_text_config(decoder=True)
    try:
        layers = int(text.num_hidden_layers)
        heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    except AttributeError as exc:
        raise InvalidInput(f"config has no KV geometry: {exc}") from exc
    return KVSpec(model, num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)


def cache_num_tokens(cache: DynamicCache) -> int:
    """Tokens held by the cache (layer 0; every full-attention layer holds the same)."""
    return int(cache.get_seq_length())


def cache_to_chunk(
    cache: DynamicCache,
    start: int = 0,
    end: int | None = None,
    *,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    batch_index: int = 0,
) -> torch.Tensor:
    """Copy tokens ``[start, end)`` of one sequence of ``cache`` into chunk layout.

    Args:
        cache: a filled ``DynamicCache`` (full-attention layers only).
        start, end: token range; ``end`` defaults to the cache length.
        dtype: result dtype (default: the cache's); ignored when ``out`` is given.
        out: optional preallocated ``[layers, 2, end-start, kv_heads, head_dim]``
            tensor to write into (its dtype wins; values are cast on copy).
        batch_index: which sequence of a batched cache.
    Returns:
        The chunk tensor, C-contiguous, on the cache's device unless ``out`` says otherwise.
    Raises:
        InvalidInput: empty or sliding-window layers, or a range outside the cache.
        ShapeMismatch: ``out`` has the wrong shape.
    """
    layers = _layer_tensors(cache)
    keys0 = layers[0][0]
    total = keys0.shape[2]
    end = total if end is None else end
    if not 0 <= start <= end <= total:
        raise InvalidInput(f"token range [{start}, {end}) outside the cache's {total} tokens")
    if not 0 <= batch_index < keys0.shape[0]:
        raise InvalidInput(f"batch_index {batch_index} outside batch of {keys0.shape[0]}")
    shape = (len(layers), 2, end - start, keys0.shape[1], keys0.shape[3])
    if out is None:
        out = torch.empty(shape, dtype=dtype or keys0.dtype, device=keys0.device)
    elif tuple(out.shape) != shape:
        raise ShapeMismatch(f"out has shape {tuple(out.shape)}, the range needs {shape}")
    for i, (keys, values) in enumerate(layers):
        out[i, 0].copy_(keys[batch_index, :, start:end].transpose(0, 1))
        out[i, 1].copy_(values[batch_index, :, start:end].transpose(0, 1))
    return out


def cache_to_chunks(
    cache: DynamicCache,
    chunk_tokens: int,
    *,
    start: int = 0,
    end: int | None = None,
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Split tokens ``[start, end)`` into chunks of ``chunk_tokens``; the last may be shorter."""
    if chunk_tokens < 1:
        raise InvalidInput(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    end = cache_num_tokens(cache) if end is None else end
    return [
        cache_to_chunk(cache, s, min(s + chunk_tokens, end), dtype=dtype)
        for s in range(start, end, chunk_tokens)
    ]


def chunk_to_layers(
    chunk: torch.Tensor, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)`` of shape ``[1, kv_heads, tokens, head_dim]`` from one chunk.

    Raises:
        ShapeMismatch: ``chunk`` is not ``[layers, 2, tokens, kv_heads, head_dim]``.
    """
    _check_layout(chunk)
    moved = chunk.to(device=device or chunk.device, dtype=dtype).permute(0, 1, 3, 2, 4)
    return [(moved[i, 0].unsqueeze(0), moved[i, 1].unsqueeze(0)) for i in range(chunk.shape[0])]


def append_chunk(cache: DynamicCache, chunk: torch.Tensor, *, dtype: torch.dtype | None = None) -> None:
    """Extend every layer of ``cache`` by the chunk's tokens (after the ones it holds).

    ``dtype`` defaults to the cache's dtype, or float32 for an empty cache.

    Raises:
        ShapeMismatch: the chunk's layer count or head geometry differs from the cache's.
    """
    _check_layout(chunk)
    held = cache_num_tokens(cache)
    if held and dtype is None:
        dtype = _layer_tensors(cache)[0][0].dtype
    if cache.layers and len(cache.layers) != chunk.shape[0]:
        raise ShapeMismatch(f"chunk has {chunk.shape[0]} layers, the cache {len(cache.layers)}")
    for i, (keys, values) in enumerate(chunk_to_layers(chunk, dtype=dtype or torch.float32)):
        cache.update(keys, values, i)


def chunks_to_cache(
    chunks: Sequence[torch.Tensor],
    *,
    config: PretrainedConfig | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    spec: KVSpec | None = None,
) -> DynamicCache:
    """A new ``DynamicCache`` holding the chunks' tokens in order.

    Args:
        chunks: chunk-layout tensors, each ``[layers, 2, n_i, kv_heads, head_dim]``.
        config: the model config (lets transformers pick each layer's cache type).
        dtype, device: of the cache's tensors (compute dtype; fp32 on CPU).
        spec: if given, every chunk must match its shape and dtype.
    Raises:
        ShapeMismatch, DTypeMismatch: a chunk does not fit the others or ``spec``.
    """
    from transformers import DynamicCache

    if not chunks:
        raise InvalidInput("chunks_to_cache needs at least one chunk")
    for chunk in chunks:
        _check_layout(chunk, like=chunks[0])
        if spec is not None:
            check_chunk(spec, chunk)
    joined = chunks[0] if len(chunks) == 1 else torch.cat(list(chunks), dim=2)
    cache = DynamicCache(config=config)
    for i, (keys, values) in enumerate(chunk_to_layers(joined, dtype=dtype, device=device)):
        cache.update(keys, values, i)
    return cache


def check_chunk(spec: KVSpec, chunk: torch.Tensor, num_tokens: int | None = None) -> None:
    """Raise unless ``chunk`` has the spec's shape (for its token count) and dtype.

    Raises:
        ShapeMismatch: wrong shape, or not ``num_tokens`` tokens when that is given.
        DTypeMismatch: the tensor's dtype is not ``spec.dtype``.
    """
    if num_tokens is None:
        token_axis = 2 if spec.layout == "kv_separate" else 1
        num_tokens = int(chunk.shape[token_axis]) if chunk.dim() > token_axis else 0
    want = spec.chunk_shape(num_tokens)
    if tuple(chunk.shape) != want:
        raise ShapeMismatch(f"chunk has shape {tuple(chunk.shape)}, the spec needs {want}")
    if chunk.dtype != torch_dtype(spec.dtype):
        raise DTypeMismatch(f"chunk has dtype {chunk.dtype}, the spec needs {spec.dtype}")


def _check_layout(chunk: torch.Tensor, like: torch.Tensor | None = None) -> None:
    if chunk.dim() != 5 or chunk.shape[1] != 2:
        raise ShapeMismatch(
            f"chunk must be [layers, 2, tokens, kv_heads, head_dim], got {tuple(chunk.shape)}"
        )
    if like is not None and (chunk.shape[:2] + chunk.shape[3:]) != (like.shape[:2] + like.shape[3:]):
        raise ShapeMismatch(f"chunk shapes differ beyond tokens: {tuple(chunk.shape)} vs {tuple(like.shape)}")


def _layer_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's (keys, values), checked to be filled full-attention layers of equal length."""
    if not cache.layers:
        raise InvalidInput("the cache holds no layers")
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i, layer in enumerate(cache.layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if getattr(layer, "is_sliding", False):
            raise InvalidInput(f"layer {i} is a sliding-window layer; token ranges are not stable")
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) or keys.dim() != 4:
            raise InvalidInput(f"layer {i} of the cache holds no KV")
        if out and keys.shape != out[0][0].shape:
            raise InvalidInput(f"layer {i} has shape {tuple(keys.shape)}, layer 0 {tuple(out[0][0].shape)}")
        out.append((keys, values))
    return out
