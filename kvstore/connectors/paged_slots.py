"""Which token slots a transfer touches: from a block table and a token range, or a slot mapping.

A slot is ``block_id * block_size + offset``: the vLLM ``slot_mapping``
convention, and SGLang's token index (``page * page_size + offset``). A
request's block table lists its block ids in token order, so token position
``p`` lives in block ``block_table[p // block_size]`` at offset
``p % block_size``; a token range may start and end inside a block.

Slots are int64 tensors, one per token, in chunk order. Everything here is
vectorized (no Python loop over tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvstore.errors import InvalidInput, ShapeMismatch

IntsLike = torch.Tensor | Sequence[int]


def as_index(values: IntsLike, what: str) -> torch.Tensor:
    """A 1-D int64 CPU tensor of ``values`` (a copy only where needed).

    Raises:
        InvalidInput: not one-dimensional, or not integers.
    """
    if isinstance(values, torch.Tensor):
        t = values
    else:
        try:
            t = torch.as_tensor(list(values), dtype=torch.int64)
        except (TypeError, ValueError, OverflowError, RuntimeError) as exc:
            raise InvalidInput(f"{what} must be a sequence of ints: {exc}") from None
    if t.dim() != 1:
        raise InvalidInput(f"{what} must be one-dimensional, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise InvalidInput(f"{what} must hold integers, got {t.dtype}")
    return t.to(device="cpu", dtype=torch.int64).contiguous()


def block_table_slots(
    block_table: IntsLike, block_size: int, start: int, end: int, num_blocks: int | None = None
) -> torch.Tensor:
    """Slots of token positions ``[start, end)`` of a request with this block table.

    Args:
        block_table: the request's block ids, in token order.
        block_size: tokens per block (page).
        start, end: the token range; either may fall inside a block.
        num_blocks: blocks in the cache; every block id the range touches must be below it.
    Returns:
        int64 tensor of ``end - start`` slots.
    Raises:
        InvalidInput: a bad range, a table too short for ``end``, or a block id
            that is negative or not below ``num_blocks``.
    """
    if block_size < 1:
        raise InvalidInput(f"block_size must be >= 1, got {block_size}")
    table = as_index(block_table, "block table")
    if not 0 <= start <= end:
        raise InvalidInput(f"token range [{start}, {end}) must have 0 <= start <= end")
    if end > table.numel() * block_size:
        raise InvalidInput(
            f"token range ends at {end} but the block table covers {table.numel() * block_size} tokens"
        )
    positions = torch.arange(start, end, dtype=torch.int64)
    if positions.numel() == 0:
        return positions
    touched = table[start // block_size : (end - 1) // block_size + 1]
    low, high = int(touched.min()), int(touched.max())
    if low < 0 or (num_blocks is not None and high >= num_blocks):
        bad = low if low < 0 else high
        limit = "" if num_blocks is None else f" (the cache has {num_blocks} blocks)"
        raise InvalidInput(f"block id {bad} is out of range{limit}")
    blocks = table[positions // block_size]
    return blocks * block_size + positions % block_size


def check_slots(slots: IntsLike, num_slots: int, num_tokens: int | None, unique: bool) -> torch.Tensor:
    """Validate a slot mapping; returns it as a 1-D int64 CPU tensor.

    Args:
        slots: one slot per token.
        num_slots: slots in the cache (``num_blocks * block_size``).
        num_tokens: the number of tokens the chunk holds (None: any).
        unique: slots must not repeat (writes: two tokens cannot share one slot).
    Raises:
        ShapeMismatch: ``len(slots) != num_tokens``.
        InvalidInput: a negative or too large slot, or a repeated slot where ``unique``.
    """
    t = as_index(slots, "slot mapping")
    if num_tokens is not None and t.numel() != num_tokens:
        raise ShapeMismatch(f"slot mapping has {t.numel()} slots for a chunk of {num_tokens} tokens")
    if t.numel() == 0:
        return t
    low, high = int(t.min()), int(t.max())
    if low < 0 or high >= num_slots:
        bad = low if low < 0 else high
        raise InvalidInput(f"slot {bad} is out of range: the cache has {num_slots} slots")
    if unique and torch.unique(t).numel() != t.numel():
        raise InvalidInput("slot mapping repeats a slot: two tokens cannot be written to one slot")
    return t
