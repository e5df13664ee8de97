"""KV layout: transformers DynamicCache <-> kvstore chunks, exactly, on the real model."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

from kvstore.errors import DTypeMismatch, InvalidInput, ShapeMismatch
from kvstore.models import (
    append_chunk,
    cache_num_tokens,
    cache_to_chunk,
    cache_to_chunks,
    check_chunk,
    chunk_to_layers,
    chunks_to_cache,
    torch_dtype,
)
from kvstore.models.smollm2 import LoadedModel
from tests.models.real_model import model_threads, require_model  # noqa: F401  (autouse fixture)

if TYPE_CHECKING:
    from transformers import DynamicCache

transformers = pytest.importorskip(
    "transformers", reason="transformers not installed: bash scripts/install_model.sh"
)

TEXT = (
    "A key-value cache keeps the attention keys and values of every token seen so far, "
    "so that the next token only attends to them instead of recomputing the whole prompt. "
) * 3


def _random_cache(layers: int = 4, heads: int = 3, tokens: int = 10, dim: int = 8) -> DynamicCache:
    cache = transformers.DynamicCache()
    gen = torch.Generator().manual_seed(0)
    for i in range(layers):
        shape = (1, heads, tokens, dim)
        cache.update(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), i)
    return cache


def _prefill(loaded: LoadedModel, ids: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    with torch.inference_mode():
        out = loaded.model(input_ids=torch.tensor([ids]), use_cache=True)
    return out.past_key_values, out.logits[0, -1]


def _next_logits(loaded: LoadedModel, cache: DynamicCache, token: int) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(input_ids=torch.tensor([[token]]), past_key_values=cache).logits[0, -1]


def test_chunk_layout_is_layers_kv_tokens_heads_dim() -> None:
    cache = _random_cache()
    chunk = cache_to_chunk(cache, 2, 7)
    assert chunk.shape == (4, 2, 5, 3, 8) and chunk.is_contiguous()
    for layer in range(4):
        for t in range(5):
            for h in range(3):
                assert torch.equal(chunk[layer, 0, t, h], cache.layers[layer].keys[0, h, 2 + t])
                assert torch.equal(chunk[layer, 1, t, h], cache.layers[layer].values[0, h, 2 + t])


def test_chunks_split_and_rejoin_exactly() -> None:
    cache = _random_cache(tokens=10)
    chunks = cache_to_chunks(cache, 4)
    assert [c.shape[2] for c in chunks] == [4, 4, 2]
    rebuilt = chunks_to_cache(chunks)
    assert cache_num_tokens(rebuilt) == 10
    for old, new in zip(cache.layers, rebuilt.layers, strict=True):
        assert torch.equal(old.keys, new.keys) and torch.equal(old.values, new.values)
    appended = transformers.DynamicCache()
    for chunk in chunks:
        append_chunk(appended, chunk)
    assert torch.equal(cache_to_chunk(appended), cache_to_chunk(cache))


def test_dtype_conversion_and_out_buffer() -> None:
    cache = _random_cache()
    out = torch.empty((4, 2, 10, 3, 8), dtype=torch.bfloat16)
    assert cache_to_chunk(cache, out=out) is out
    assert torch.equal(out, cache_to_chunk(cache).to(torch.bfloat16))
    assert torch.equal(cache_to_chunk(cache, dtype=torch.float16), cache_to_chunk(cache).half())
    back = chunks_to_cache([out], dtype=torch.float32)
    assert back.layers[0].keys.dtype == torch.float32
    assert torch.equal(back.layers[0].keys, out[0, 0].float().permute(1, 0, 2).unsqueeze(0))
    keys, values = chunk_to_layers(out, dtype=torch.float16)[3]
    assert keys.shape == values.shape == (1, 3, 10, 8) and keys.dtype == torch.float16


def test_bad_ranges_and_shapes_are_rejected() -> None:
    cache = _random_cache()
    with pytest.raises(InvalidInput, match="outside"):
        cache_to_chunk(cache, 5, 11)
    with pytest.raises(InvalidInput):
        cache_to_chunk(cache, 6, 5)
    with pytest.raises(ShapeMismatch):
        cache_to_chunk(cache, out=torch.empty(4, 2, 9, 3, 8))
    with pytest.raises(ShapeMismatch):
        chunks_to_cache([torch.zeros(4, 3, 5, 3, 8)])
    with pytest.raises(ShapeMismatch, match="beyond tokens"):
        chunks_to_cache([torch.zeros(4, 2, 5, 3, 8), torch.zeros(4, 2, 5, 2, 8)])
    with pytest.raises(ShapeMismatch, match="layers"):
        append_chunk(cache, torch.zeros(5, 2, 1, 3, 8))
    with pytest.raises(InvalidInput, match="no layers"):
        cache_to_chunk(transformers.DynamicCache())
    assert torch_dtype("bfloat16") == torch.bfloat16


def test_check_chunk_against_the_model_spec() -> None:
    loaded = require_model()
    spec = loaded.spec  # bfloat16
    good = torch.zeros(spec.chunk_shape(16), dtype=torch.bfloat16)
    check_chunk(spec, good)
    check_chunk(spec, good, num_tokens=16)
    with pytest.raises(ShapeMismatch):
        check_chunk(spec, good, num_tokens=15)
    with pytest.raises(DTypeMismatch):
        check_chunk(spec, good.float())
    with pytest.raises(ShapeMismatch):
        check_chunk(spec, torch.zeros(30, 2, 16, 9, 64, dtype=torch.bfloat16))
    with pytest.raises(DTypeMismatch):
        chunks_to_cache([good.half()], spec=spec)


def test_round_trip_gives_identical_next_token_logits() -> None:
    loaded = require_model()
    ids = loaded.encode(TEXT)
    cache, _ = _prefill(loaded, ids[:-1])
    chunks = cache_to_chunks(cache, 16)
    assert sum(c.shape[2] for c in chunks) == len(ids) - 1
    for chunk in chunks:
        check_chunk(loaded.spec_for("float32"), chunk)
    rebuilt = chunks_to_cache(chunks, config=loaded.model.config)
    expected = _next_logits(loaded, cache, ids[-1])
    assert torch.equal(_next_logits(loaded, rebuilt, ids[-1]), expected)


def test_prefix_reuse_matches_a_full_prefill() -> None:
    """KV of a prefix, stored as bf16 chunks and loaded back, serves the rest of the prompt."""
    loaded = require_model()
    ids = loaded.encode(TEXT)
    split = 32
    _, full_last = _prefill(loaded, ids)
    prefix_cache, _ = _prefill(loaded, ids[:split])
    stored = cache_to_chunks(prefix_cache, 16, dtype=torch_dtype(loaded.spec.dtype))
    for chunk in stored:
        check_chunk(loaded.spec, chunk, num_tokens=16)
    reused = chunks_to_cache(stored, config=loaded.model.config)
    with torch.inference_mode():
        rest = loaded.model(input_ids=torch.tensor([ids[split:]]), past_key_values=reused).logits[0, -1]
    assert cache_num_tokens(reused) == len(ids)
    assert int(rest.argmax()) == int(full_last.argmax())
    probs_full, probs_reused = full_last.softmax(-1), rest.softmax(-1)
    assert float((probs_full - probs_reused).abs().max()) < 1e-2  # bf16 storage, fp32 compute
