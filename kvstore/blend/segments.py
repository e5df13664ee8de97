"""A blended prompt's parts: reused passages (with their KV) and uncached token runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvstore.errors import InvalidInput, ShapeMismatch


@dataclass(frozen=True, slots=True, eq=False)
class PassageKV:
    """A passage's tokens and the KV computed for them on their own.

    Invariants: ``kv`` is ``[layers, 2, len(tokens), kv_heads, head_dim]``
    (kvstore's chunk layout, K at index 0 of axis 1) and was computed at
    positions ``start_position .. start_position + len(tokens) - 1``.
    """

    tokens: tuple[int, ...]
    kv: torch.Tensor
    start_position: int = 0

    def __post_init__(self) -> None:
        if not self.tokens:
            raise InvalidInput("a passage needs at least one token")
        if self.kv.dim() != 5 or self.kv.shape[1] != 2 or self.kv.shape[2] != len(self.tokens):
            raise ShapeMismatch(
                f"passage KV must be [layers, 2, {len(self.tokens)}, kv_heads, head_dim], got {tuple(self.kv.shape)}"
            )
        if self.start_position < 0:
            raise InvalidInput(f"start_position must be >= 0, got {self.start_position}")

    def __len__(self) -> int:
        return len(self.tokens)


Segment = PassageKV | Sequence[int]
"""A reused passage, or token ids computed fresh (instructions, the question, glue text)."""


@dataclass(frozen=True, slots=True, eq=False)
class Assembled:
    """The prompt laid out: token ids ``[T]``, which positions hold reused KV, and where each passage sits.

    ``keys``/``values`` are ``[layers, kv_heads, T, head_dim]`` float32 (views
    of token-major ``[layers, T, kv_heads, head_dim]`` storage): the
    passages' KV with keys re-rotated to their new positions, zeros at
    uncached positions (every one of which is computed). ``passage_of`` is
    int ``[T]``: the index of the passage at each position, -1 where uncached.
    """

    ids: torch.Tensor
    reused: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    passage_offsets: tuple[int, ...]
    passage_of: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.ids.numel())
