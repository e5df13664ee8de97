"""Views of one layer's vLLM paged KV cache as ``(2, num_blocks, block_size, kv_heads, head_dim)``.

vLLM has laid a layer's paged cache out in several ways over its releases:

- ``kv_blocks``: ``(2, num_blocks, block_size, kv_heads, head_dim)``, K then V
  (the flash-attention layout of the 0.x v1 engine);
- ``blocks_kv``: ``(num_blocks, 2, block_size, kv_heads, head_dim)``;
- ``heads_tokens``: the pinned release (0.33.0) registers a logical 4-D view
  ``[blocks, kv_heads, block_size, head_dim_k + head_dim_v]`` per layer (K in
  the first half of the last axis, V in the second), whatever the physical
  stride order.

:func:`kv_blocks_view` turns each into the first one *as a view* (no copy), so
:mod:`kvstore.connectors.paged` (layout ``vllm_flash_nhd``, which follows a
tensor's strides) gathers and scatters all of them, and writes through the
view land in the engine's cache.
"""

from __future__ import annotations

import torch

from kvstore.connectors.vllm_settings import PagedLayout
from kvstore.errors import InvalidInput, ShapeMismatch


def detect_layout(layer: torch.Tensor, num_kv_heads: int, head_dim: int) -> PagedLayout:
    """Tell the layout of one layer's cache from its shape.

    Raises:
        ShapeMismatch: no known layout fits, or two do (say which with ``paged_layout``).
    """
    fits: list[PagedLayout] = []
    s = tuple(layer.shape)
    if len(s) == 5 and s[3:] == (num_kv_heads, head_dim):
        if s[0] == 2:
            fits.append("kv_blocks")
        if s[1] == 2:
            fits.append("blocks_kv")
    if len(s) == 4 and s[1] == num_kv_heads and s[3] == 2 * head_dim:
        fits.append("heads_tokens")
    if len(fits) != 1:
        what = "no known layout" if not fits else f"several layouts {fits}"
        raise ShapeMismatch(
            f"paged cache of shape {s} matches {what} for {num_kv_heads} kv heads of dim {head_dim}; "
            "set paged_layout in the connector's extra config"
        )
    return fits[0]


def kv_blocks_view(layer: torch.Tensor, layout: PagedLayout, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """``layer`` seen as ``(2, num_blocks, block_size, kv_heads, head_dim)``, sharing its memory.

    Raises:
        ShapeMismatch: the tensor does not have the layout's shape.
        InvalidInput: ``layout`` is ``auto`` (resolve it with :func:`detect_layout` first).
    """
    s = tuple(layer.shape)
    if layout == "kv_blocks" and len(s) == 5 and s[0] == 2 and s[3:] == (num_kv_heads, head_dim):
        return layer
    if layout == "blocks_kv" and len(s) == 5 and s[1] == 2 and s[3:] == (num_kv_heads, head_dim):
        return layer.transpose(0, 1)
    if layout == "heads_tokens" and len(s) == 4 and s[1] == num_kv_heads and s[3] == 2 * head_dim:
        try:
            split = layer.view(*s[:3], 2, head_dim)  # never a copy: writes must reach the engine's cache
        except RuntimeError as exc:
            raise ShapeMismatch(f"cannot split the last axis of a cache with strides {layer.stride()}") from exc
        return split.permute(3, 0, 2, 1, 4)
    if layout == "auto":
        raise InvalidInput("resolve an 'auto' layout with detect_layout first")
    raise ShapeMismatch(f"paged cache of shape {s} is not a {layout} cache of {num_kv_heads} heads x {head_dim}")

