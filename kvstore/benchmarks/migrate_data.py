"""What ``kvstore bench migrate`` moves: real SmolLM2 KV of a real prompt, and Llama-3-8B-geometry chunks.

- **SmolLM2**: the model prefills a real prompt (a Python-docs passage,
  ``kvstore.codecs.cachegen_bench.prompt_ids``) of ``context`` tokens; its
  KV is stored as bfloat16 in 256-token chunks under the prompt's prefix
  keys. The prompt's next ``continuation`` tokens score the quality of what
  arrived (teacher-forced, ``kvstore.quality``) against the same KV in
  bfloat16 (``StoredKVHarness``: the reference is the KV as a store holds it).
- **Llama-3-8B geometry** (32 layers, 8 KV heads, head dim 128, bfloat16:
  128 KiB per token, 256 tokens = 32 MiB per chunk): synthetic, made to look
  like KV rather than noise, see :func:`llama_like_chunk`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvstore.buffers import U8
from kvstore.keys import ChunkKey, Namespace, prefix_keys
from kvstore.spec import KVSpec, ModelFingerprint

LLAMA_SPEC = KVSpec(ModelFingerprint("llama-3-8b-geometry", "synthetic"), 32, 8, 128, "bfloat16")
CHUNK_TOKENS = 256


@dataclass(frozen=True, slots=True)
class Payload:
    """Chunks of one namespace, in order, with their keys.

    Invariant: ``len(keys) == len(chunks)``; every chunk is ``ns``'s bytes per
    token times a whole number of tokens.
    """

    name: str
    ns: Namespace
    keys: tuple[ChunkKey, ...]
    chunks: tuple[U8, ...]

    @property
    def nbytes(self) -> int:
        return sum(c.size for c in self.chunks)


def llama_like_chunk(spec: KVSpec, tokens: int, rng: np.random.Generator) -> U8:
    """One synthetic chunk ``[layers, 2, tokens, heads, dim]`` in bfloat16, built to resemble real KV.

    Per layer, K/V and head, every channel gets a scale drawn log-normally
    (sigma 0.6); keys get a per-channel offset (keys vary per channel, as
    KIVI observes) and 4 outlier channels per head at 8x scale; every channel
    follows an AR(1) process along the tokens (correlation 0.85, so
    neighbouring tokens are alike, as in real KV, which delta coders use),
    and values are about 4x smaller than keys.
    """
    shape = (spec.num_layers, 2, spec.num_kv_heads, spec.head_dim)
    scale = np.exp(rng.normal(0.0, 0.6, shape)).astype(np.float32)
    scale[:, 1] *= 0.25
    outliers = rng.integers(0, spec.head_dim, (spec.num_layers, spec.num_kv_heads, 4))
    for layer in range(spec.num_layers):
        for head in range(spec.num_kv_heads):
            scale[layer, 0, head, outliers[layer, head]] *= 8.0
    offset = (rng.normal(0.0, 1.0, shape) * scale).astype(np.float32)
    offset[:, 1] = 0.0
    rho = np.float32(0.85)
    noise = rng.standard_normal((tokens, *shape), dtype=np.float32)
    state = noise[0]
    out = np.empty((tokens, *shape), dtype=np.float32)
    out[0] = state
    innovation = np.float32(np.sqrt(1.0 - rho * rho))
    for t in range(1, tokens):
        state = rho * state + innovation * noise[t]
        out[t] = state
    kv = out * scale + offset  # [tokens, layers, 2, heads, dim]
    arranged = np.ascontiguousarray(kv.transpose(1, 2, 0, 3, 4))
    return torch.from_numpy(arranged).to(torch.bfloat16).view(torch.uint8).numpy().reshape(-1).copy()


def llama_payload(count: int, chunk_tokens: int, seed: int) -> Payload:
    """``count`` chunks of ``chunk_tokens`` tokens of Llama-3-8B geometry under one token sequence's keys."""
    rng = np.random.default_rng(seed)
    ns = Namespace("bench", LLAMA_SPEC, chunk_tokens=chunk_tokens)
    tokens = [int(t) for t in rng.integers(0, 128_000, count * chunk_tokens)]
    chunks = tuple(llama_like_chunk(LLAMA_SPEC, chunk_tokens, rng) for _ in range(count))
    return Payload("llama-3-8b-geometry", ns, tuple(prefix_keys(ns, tokens)), chunks)


def kv_chunks(kv: torch.Tensor, chunk_tokens: int) -> list[U8]:
    """bfloat16 chunk bytes of a float ``[layers, 2, tokens, heads, dim]`` KV, ``chunk_tokens`` at a time."""
    bf = kv.to(torch.bfloat16)
    return [bf[:, :, t : t + chunk_tokens].contiguous().view(torch.uint8).numpy().reshape(-1).copy()
            for t in range(0, kv.shape[2], chunk_tokens)]  # fmt: skip


def chunks_to_kv(chunks: Sequence[U8], spec: KVSpec) -> torch.Tensor:
    """The float32 KV ``[layers, 2, tokens, heads, dim]`` of bfloat16 chunk bytes (inverse of kv_chunks)."""
    parts = []
    for raw in chunks:
        tokens = raw.size // spec.bytes_per_token
        t = torch.from_numpy(np.ascontiguousarray(raw)).view(torch.bfloat16)
        parts.append(t.reshape(spec.num_layers, 2, tokens, spec.num_kv_heads, spec.head_dim).float())
    return torch.cat(parts, dim=2)
