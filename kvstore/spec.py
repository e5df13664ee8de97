"""KV spec: what the bytes of a KV cache mean.

A :class:`KVSpec` is part of every namespace, so two caches whose bytes mean
different things (another model, dtype, layout or shard) never share a key.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Literal, get_args

from kvstore.errors import InvalidInput

DType = Literal[
    "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int8", "uint8"
]
Layout = Literal["kv_separate", "mla_latent"]

DTYPE_ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}

#: entries per token per layer: K and V separately, or one MLA latent vector
LAYOUT_KV_FACTOR: dict[str, int] = {"kv_separate": 2, "mla_latent": 1}


def _encode_fields(values: list[str]) -> bytes:
    """Length-prefixed UTF-8 fields: u32le(len) || bytes for each, in order."""
    out = bytearray()
    for value in values:
        raw = value.encode("utf-8")
        out += struct.pack("<I", len(raw))
        out += raw
    return bytes(out)


@dataclass(frozen=True, slots=True)
class ModelFingerprint:
    """Identifies the weights that produced a KV cache.

    ``revision`` is a release tag, commit or a digest of the weights; two
    fingerprints are the same model only if both fields match.
    """

    name: str
    revision: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidInput("model fingerprint needs a non-empty name")


@dataclass(frozen=True, slots=True)
class Shard:
    """Which slice of the model's KV a cache holds (tensor and pipeline parallel)."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.pp_size < 1:
            raise InvalidInput("tp_size and pp_size must be >= 1")
        if not 0 <= self.tp_rank < self.tp_size:
            raise InvalidInput(f"tp_rank {self.tp_rank} outside [0, {self.tp_size})")
        if not 0 <= self.pp_rank < self.pp_size:
            raise InvalidInput(f"pp_rank {self.pp_rank} outside [0, {self.pp_size})")


@dataclass(frozen=True, slots=True)
class KVSpec:
    """The meaning of a KV cache's bytes.

    Invariants: all sizes are positive; ``mla_latent`` has one kv head.
    A chunk of ``n`` tokens has shape :meth:`chunk_shape` and
    ``n * bytes_per_token`` bytes, laid out C-contiguously:
    ``kv_separate`` is ``[layers, 2, tokens, kv_heads, head_dim]`` (K then V),
    ``mla_latent`` is ``[layers, tokens, head_dim]``.
    """

    model: ModelFingerprint
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: DType = "bfloat16"
    layout: Layout = "kv_separate"
    shard: Shard = field(default_factory=Shard)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidInput(f"{name} must be a positive int, got {value!r}")
        if self.dtype not in get_args(DType):
            raise InvalidInput(f"unknown dtype {self.dtype!r}; one of {get_args(DType)}")
        if self.layout not in get_args(Layout):
            raise InvalidInput(f"unknown layout {self.layout!r}; one of {get_args(Layout)}")
        if self.layout == "mla_latent" and self.num_kv_heads != 1:
            raise InvalidInput("mla_latent layout has exactly one kv head")

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def kv_factor(self) -> int:
        return LAYOUT_KV_FACTOR[self.layout]

    @property
    def bytes_per_token(self) -> int:
        """Bytes of KV one token occupies across all layers of this shard."""
        return self.num_layers * self.kv_factor * self.num_kv_heads * self.head_dim * self.itemsize

    def chunk_shape(self, num_tokens: int) -> tuple[int, ...]:
        """Shape of the tensor holding ``num_tokens`` tokens of KV."""
        if self.layout == "mla_latent":
            return (self.num_layers, num_tokens, self.head_dim)
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_dim)

    def chunk_nbytes(self, num_tokens: int) -> int:
        return num_tokens * self.bytes_per_token

    def identity_bytes(self) -> bytes:
        """Canonical bytes naming this spec; specified in docs/keys.md."""
        s = self.shard
        return _encode_fields(
            [
                self.model.name,
                self.model.revision,
                str(self.num_layers),
                str(self.num_kv_heads),
                str(self.head_dim),
                self.dtype,
                self.layout,
                str(s.tp_rank),
                str(s.tp_size),
                str(s.pp_rank),
                str(s.pp_size),
            ]
        )


def encode_fields(values: list[str]) -> bytes:
    """Public form of the length-prefixed field encoding used by keys."""
    return _encode_fields(values)
