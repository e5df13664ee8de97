"""Paged KV gather (engine pages -> kvstore chunk) and scatter (chunk -> pages).

Engines keep KV in pages (blocks) named by block tables; kvstore stores a
run of tokens as one C-contiguous chunk ``[layers, 2, tokens, kv_heads,
head_dim]`` (K at 0, V at 1), or ``[layers, tokens, latent_dim]`` for MLA
(``KVSpec.chunk_shape``). A transfer names its tokens by slot (``block_id *
block_size + offset``, in chunk order)::

    cache = PagedKVCache.wrap(kv_caches, "vllm_flash_nhd")      # once, at registration
    slots = cache.block_table_slots(block_ids, start, end)      # or a slot mapping
    chunk = gather(cache, slots)                                # [L, 2, end - start, H, D]
    scatter(cache, slots, chunk)                                # and back

Layouts (``paged_layouts.py``): ``vllm_flash_nhd``, ``vllm_flash_hnd``,
``flashinfer_nhd``, ``flashinfer_hnd``, ``mla``, ``sglang_layer_first``,
``sglang_page_first``, ``sglang_page_first_direct``, ``sglang_page_head``.
The copy itself is a :class:`PagedMover`: :class:`TorchMover` (any device;
the default) or :class:`~kvstore.connectors.paged_cuda.KernelMover` (CUDA
kernels through CuPy; :func:`mover_for` picks it where it can run). Both give
the same bytes. See docs/paged.md.
"""

from __future__ import annotations

import torch

from kvstore.connectors.paged_cache import PagedGeometry, PagedKVCache, RowMap
from kvstore.connectors.paged_cuda import KernelMover, cupy_available
from kvstore.connectors.paged_layouts import PagedLayout, get_layout, layout_names, register_layout
from kvstore.connectors.paged_slots import IntsLike, block_table_slots, check_slots
from kvstore.connectors.paged_torch import PagedMover, TorchMover
from kvstore.errors import InvalidInput

__all__ = [
    "KernelMover",
    "PagedGeometry",
    "PagedKVCache",
    "PagedLayout",
    "PagedMover",
    "RowMap",
    "TorchMover",
    "block_table_slots",
    "check_slots",
    "gather",
    "gather_layer",
    "get_layout",
    "layout_names",
    "mover_for",
    "register_layout",
    "scatter",
    "scatter_layer",
]


def mover_for(device: torch.device) -> PagedMover:
    """The CUDA kernels for a CUDA device when CuPy is installed, else the torch path.

    Make one per engine (it holds the compiled kernels) and pass it to every call.
    """
    if device.type == "cuda" and cupy_available():
        return KernelMover()
    return TorchMover()


def _layer(cache: PagedKVCache, layer: int) -> int:
    if not 0 <= layer < cache.geometry.num_layers:
        raise InvalidInput(f"layer {layer} outside [0, {cache.geometry.num_layers})")
    return layer


def gather(
    cache: PagedKVCache, slots: IntsLike, out: torch.Tensor | None = None, *, mover: PagedMover | None = None
) -> torch.Tensor:
    """Copy the tokens at ``slots`` of every layer out of the pages into a chunk.

    Args:
        cache: the wrapped pages.
        slots: one slot per token, in chunk order (may repeat).
        out: a contiguous chunk to fill (default: a new one on the cache's device).
        mover: how to copy (default :class:`TorchMover`).
    Returns:
        ``out``, shaped ``cache.geometry.chunk_shape(len(slots))``.
    Raises:
        ShapeMismatch: ``out`` has the wrong shape or layer count, or ``len(slots)`` is not its token count.
        DTypeMismatch: ``out`` holds another dtype than the pages.
        InvalidInput: a slot out of range, ``out`` not contiguous or on another device.
    """
    g = cache.geometry
    if out is None:
        checked = cache.check_slots(slots)
        out = torch.empty(g.chunk_shape(checked.numel()), dtype=cache.dtype, device=cache.device)
    else:
        checked = cache.check_slots(slots, cache.check_chunk(out, "out"))
    (mover or TorchMover()).gather(cache, checked, 0, out)
    return out


def scatter(
    cache: PagedKVCache, slots: IntsLike, chunk: torch.Tensor, *, mover: PagedMover | None = None
) -> None:
    """Copy a chunk into the pages at ``slots`` (every layer); other slots are left untouched.

    Raises:
        ShapeMismatch: the chunk's shape or layer count differs, or ``len(slots)`` is not its token count.
        DTypeMismatch: the chunk holds another dtype than the pages.
        InvalidInput: a slot out of range or repeated, a chunk not contiguous or on another device.
    """
    checked = cache.check_slots(slots, cache.check_chunk(chunk), unique=True)
    (mover or TorchMover()).scatter(cache, checked, 0, chunk)


def gather_layer(
    cache: PagedKVCache,
    slots: IntsLike,
    layer: int,
    out: torch.Tensor | None = None,
    *,
    mover: PagedMover | None = None,
) -> torch.Tensor:
    """:func:`gather` of one layer: ``[2, tokens, kv_heads, head_dim]`` (MLA ``[tokens, latent_dim]``).

    Raises:
        InvalidInput: ``layer`` out of range, and as :func:`gather`.
    """
    first = _layer(cache, layer)
    if out is None:
        checked = cache.check_slots(slots)
        shape = cache.geometry.layer_chunk_shape(checked.numel())
        out = torch.empty(shape, dtype=cache.dtype, device=cache.device)
    else:
        checked = cache.check_slots(slots, cache.check_chunk(out, "out", layer=True))
    (mover or TorchMover()).gather(cache, checked, first, out.unsqueeze(0))
    return out


def scatter_layer(
    cache: PagedKVCache, slots: IntsLike, layer: int, chunk: torch.Tensor, *, mover: PagedMover | None = None
) -> None:
    """:func:`scatter` of one layer (``chunk`` as :func:`gather_layer` returns it).

    Raises:
        InvalidInput: ``layer`` out of range, and as :func:`scatter`.
    """
    first = _layer(cache, layer)
    checked = cache.check_slots(slots, cache.check_chunk(chunk, layer=True), unique=True)
    (mover or TorchMover()).scatter(cache, checked, first, chunk.unsqueeze(0))
