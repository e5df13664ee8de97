"""An engine's paged KV memory, validated once: geometry, per-layer views and where each token's rows lie.

:meth:`PagedKVCache.wrap` takes what an engine registers (a list of per-layer
tensors, or one tensor of every layer for SGLang's host pools) and a
:class:`~kvstore.connectors.paged_layouts.PagedLayout`, and checks it once, the
way a connector's ``register_kv_caches`` would. Strides are honoured rather
than assumed: a permuted view (vLLM's HND cache), a per-layer slice of a
cross-layer allocation or of an SGLang pool all work, as long as each head's
``dim`` values are contiguous.

Moving data is row copies. A *row* is the longest run of elements that is
contiguous both in the pages and in the chunk: ``kv_heads * head_dim``
elements of one token when a token's heads are adjacent (NHD layouts, MLA,
SGLang ``page_first``), ``head_dim`` elements of one head otherwise (HND,
``page_head``). :class:`RowMap` says where the row of (kv, slot, head) is
inside a layer's memory, counted in rows from the layer's first element; all
strides are multiples of the row length, so every row is whole.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvstore.connectors.paged_layouts import Axis, PagedLayout, get_layout
from kvstore.connectors.paged_slots import IntsLike, as_index, block_table_slots, check_slots
from kvstore.errors import DTypeMismatch, InvalidInput, ShapeMismatch
from kvstore.spec import KVSpec

#: KV dtypes the pages may hold (the dtypes a KVSpec names), by torch dtype
PAGE_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float8_e4m3fn: "float8_e4m3fn",
    torch.float8_e5m2: "float8_e5m2",
    torch.int8: "int8",
    torch.uint8: "uint8",
}


@dataclass(frozen=True, slots=True)
class PagedGeometry:
    """Sizes of a paged cache. MLA has ``kv == 1`` and ``num_kv_heads == 1`` (``head_dim`` is the latent dim)."""

    num_layers: int
    kv: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def is_mla(self) -> bool:
        return self.kv == 1

    def chunk_shape(self, num_tokens: int) -> tuple[int, ...]:
        """``[layers, 2, tokens, kv_heads, head_dim]``, or ``[layers, tokens, latent_dim]`` for MLA
        (``KVSpec.chunk_shape``; the same bytes as ``[layers, 1, tokens, 1, latent_dim]``)."""
        if self.is_mla:
            return (self.num_layers, num_tokens, self.head_dim)
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_dim)

    def layer_chunk_shape(self, num_tokens: int) -> tuple[int, ...]:
        return self.chunk_shape(num_tokens)[1:]


@dataclass(frozen=True, slots=True)
class RowMap:
    """Where the rows of a token lie inside one layer's memory (the same for every layer).

    ``run`` elements make a row; ``rows_per_token`` rows per (kv, token): 1
    when a token's heads are adjacent, else one per head. Strides are counted
    in rows. Invariant: rows of distinct (kv, slot, head) never overlap, and
    the ``span`` rows from a layer's first element hold all of its pages.
    """

    run: int
    rows_per_token: int
    kv: int
    block_size: int
    kv_stride: int
    block_stride: int
    token_stride: int
    head_stride: int
    span: int

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Row of every (kv, token, head) in chunk order (``kv`` outer, then token, then head)."""
        blocks = torch.div(slots, self.block_size, rounding_mode="floor")
        base = blocks * self.block_stride + (slots - blocks * self.block_size) * self.token_stride
        kv = torch.arange(self.kv, dtype=torch.int64, device=slots.device) * self.kv_stride
        heads = torch.arange(self.rows_per_token, dtype=torch.int64, device=slots.device) * self.head_stride
        return (kv[:, None, None] + base[None, :, None] + heads[None, None, :]).reshape(-1)


def _consistent(strides: dict[Axis, int], sizes: dict[Axis, int], order: tuple[Axis, ...]) -> bool:
    """Strides do not increase along ``order`` (size-1 axes ignored): memory is in that order."""
    seen = [strides[a] for a in order if sizes[a] > 1]
    return all(a >= b for a, b in itertools.pairwise(seen))


def _read_axes(t: torch.Tensor, layout: PagedLayout) -> tuple[Axis, ...]:
    """The axes ``t`` is in: the layout's memory order, or the engine's logical order if its strides say so.

    Raises:
        ShapeMismatch: ``t`` has the wrong number of dimensions or no K/V axis of 2.
    """
    candidates = [layout.axes] + ([layout.engine_axes] if layout.engine_axes else [])
    if layout.all_layers:
        candidates = [layout.layer_axes(c) for c in candidates]
    if t.dim() != len(candidates[0]):
        raise ShapeMismatch(
            f"layout {layout.name!r} wants {len(candidates[0])}-d tensors {candidates[0]}, got shape "
            f"{tuple(t.shape)}"
        )
    memory_order = candidates[0]
    for axes in candidates:
        sizes = dict(zip(axes, t.shape))
        if _consistent(dict(zip(axes, t.stride())), sizes, memory_order):
            chosen = axes
            break
    else:
        chosen = memory_order  # strides are honoured whatever their order
    if "kv" in chosen and dict(zip(chosen, t.shape))["kv"] != 2:
        raise ShapeMismatch(
            f"layout {layout.name!r}: the K/V axis must have size 2, got shape {tuple(t.shape)}"
        )
    return chosen


def _layer_views(caches: torch.Tensor | Sequence[torch.Tensor], layout: PagedLayout) -> list[torch.Tensor]:
    """One tensor per layer (selecting the layer axis of an all-layer tensor)."""
    if layout.all_layers:
        if not isinstance(caches, torch.Tensor):
            raise InvalidInput(f"layout {layout.name!r} keeps every layer in one tensor; pass that tensor")
        if caches.dim() != len(layout.axes):
            raise ShapeMismatch(
                f"layout {layout.name!r} wants a {len(layout.axes)}-d tensor {layout.axes}, "
                f"got shape {tuple(caches.shape)}"
            )
        axis = layout.axes.index("layer")
        return [caches.select(axis, i) for i in range(caches.shape[axis])]
    if isinstance(caches, torch.Tensor):
        raise InvalidInput(f"layout {layout.name!r} has one tensor per layer; pass a list of them")
    views = list(caches)
    if not views or not all(isinstance(v, torch.Tensor) for v in views):
        raise InvalidInput("pass a non-empty list of per-layer tensors")
    return views


def _check_same(views: list[torch.Tensor]) -> None:
    first = views[0]
    if first.dtype not in PAGE_DTYPES:
        raise DTypeMismatch(f"pages hold {first.dtype}; supported: {[str(d) for d in PAGE_DTYPES]}")
    for i, v in enumerate(views[1:], start=1):
        if v.dtype != first.dtype:
            raise DTypeMismatch(f"layer {i} holds {v.dtype}, layer 0 {first.dtype}")
        if v.device != first.device:
            raise InvalidInput(f"layer {i} is on {v.device}, layer 0 on {first.device}")
        if v.shape != first.shape or v.stride() != first.stride():
            raise ShapeMismatch(
                f"layer {i} has shape {tuple(v.shape)} strides {v.stride()}, layer 0 "
                f"{tuple(first.shape)} strides {first.stride()}"
            )


def _row_map(sizes: dict[Axis, int], strides: dict[Axis, int], block_size: int, name: str) -> RowMap:
    """Rows and row strides of one layer from its element sizes and strides (see :class:`RowMap`)."""
    dim, heads = sizes["dim"], sizes.get("head", 1)
    if dim > 1 and strides["dim"] != 1:
        raise ShapeMismatch(f"layout {name!r}: the head dim must be contiguous (stride 1)")
    merged = heads == 1 or strides["head"] == dim
    run = dim * heads if merged else dim
    per_token = 1 if merged else heads
    moving: dict[str, tuple[int, int]] = {  # axis -> (size, stride in elements)
        "kv": (sizes.get("kv", 1), strides.get("kv", 0)),
        "block": (sizes["block"], strides["block"]),
        "token": (block_size, strides["token"]),
        "head": (per_token, strides.get("head", 0)),
    }
    for axis, (size, stride) in moving.items():
        if size > 1 and stride % run:
            raise ShapeMismatch(f"layout {name!r}: the {axis} stride {stride} is not a multiple of {run}")
    rows = {a: (n, s // run if n > 1 else 0) for a, (n, s) in moving.items()}
    extent = 1
    for n, s in sorted((v for v in rows.values() if v[0] > 1), key=lambda v: v[1]):
        if s < extent:
            raise InvalidInput(f"layout {name!r}: the pages overlap in memory (an expanded or aliased view)")
        extent = s * (n - 1) + extent
    return RowMap(
        run=run,
        rows_per_token=per_token,
        kv=rows["kv"][0],
        block_size=block_size,
        kv_stride=rows["kv"][1],
        block_stride=rows["block"][1],
        token_stride=rows["token"][1],
        head_stride=rows["head"][1],
        span=extent,
    )


@dataclass(frozen=True, slots=True)
class PagedKVCache:
    """A validated paged KV cache: the layout, its geometry and one view per layer.

    Invariants: every layer view has the same shape, strides, dtype and
    device; ``rowmap`` locates every (kv, slot, head) row of any layer
    relative to that layer's first element; ``row_views[i]`` is layer ``i``'s
    memory as ``[rowmap.span, rowmap.run]`` rows (a view, never a copy).
    """

    layout: PagedLayout
    geometry: PagedGeometry
    dtype: torch.dtype
    device: torch.device
    layers: tuple[torch.Tensor, ...]
    rowmap: RowMap
    row_views: tuple[torch.Tensor, ...]

    @classmethod
    def wrap(
        cls,
        caches: torch.Tensor | Sequence[torch.Tensor],
        layout: str | PagedLayout,
        *,
        page_size: int = 1,
    ) -> PagedKVCache:
        """Check an engine's KV tensors against ``layout`` and wrap them (no copy).

        Args:
            caches: per-layer tensors, or one tensor of every layer for an all-layer layout.
            layout: a layout or its registered name (``kvstore.connectors.paged_layouts``).
            page_size: tokens per page of a slot-indexed layout (SGLang ``page_first`` /
                ``layer_first``), used to map block tables to slots; other layouts take
                the block size from the tensor's shape.
        Raises:
            UnknownName: unknown layout name.
            ShapeMismatch: wrong number of dimensions, K/V axis not 2, layers of different
                shapes or strides, or strides that split a head's dim.
            DTypeMismatch: a dtype that is not a KV dtype, or layers of different dtypes.
            InvalidInput: wrong container (list vs tensor), a bad page size, aliased memory.
        """
        lay = get_layout(layout) if isinstance(layout, str) else layout
        views = _layer_views(caches, lay)
        _check_same(views)
        axes = _read_axes(views[0], lay)
        sizes = dict(zip(axes, views[0].shape))
        strides = dict(zip(axes, views[0].stride()))
        if lay.slot_indexed:
            if page_size < 1 or sizes["slot"] % page_size:
                raise InvalidInput(f"page_size {page_size} must be >= 1 and divide the {sizes['slot']} slots")
            sizes["block"], sizes["token"] = sizes["slot"] // page_size, page_size
            strides["block"], strides["token"] = strides["slot"] * page_size, strides["slot"]
        geometry = PagedGeometry(
            num_layers=len(views),
            kv=sizes.get("kv", 1),
            num_blocks=sizes["block"],
            block_size=sizes["token"],
            num_kv_heads=sizes.get("head", 1),
            head_dim=sizes["dim"],
        )
        if min(geometry.num_blocks, geometry.block_size, geometry.num_kv_heads, geometry.head_dim) < 1:
            raise ShapeMismatch(f"layout {lay.name!r}: empty cache of shape {tuple(views[0].shape)}")
        rowmap = _row_map(sizes, strides, geometry.block_size, lay.name)
        row_views = tuple(
            torch.as_strided(v, (rowmap.span, rowmap.run), (rowmap.run, 1), v.storage_offset()) for v in views
        )
        return cls(lay, geometry, views[0].dtype, views[0].device, tuple(views), rowmap, row_views)

    def block_table_slots(
        self, block_table: IntsLike, start: int = 0, end: int | None = None, *, block_size: int | None = None
    ) -> torch.Tensor:
        """Slots of tokens ``[start, end)`` of a request with this block table (default: the whole table).

        ``block_size`` defaults to the cache's; a slot-indexed pool may name
        another page size (it must divide the slots).

        Raises:
            InvalidInput: a bad range, a table too short, or a block id out of range.
        """
        size = self.geometry.block_size if block_size is None else block_size
        if size < 1 or self.geometry.num_slots % size:
            raise InvalidInput(
                f"block_size {size} must be >= 1 and divide the {self.geometry.num_slots} slots"
            )
        table = as_index(block_table, "block table")
        stop = table.numel() * size if end is None else end
        return block_table_slots(table, size, start, stop, self.geometry.num_slots // size)

    def check_slots(
        self, slots: IntsLike, num_tokens: int | None = None, *, unique: bool = False
    ) -> torch.Tensor:
        """A slot mapping checked against this cache (see :func:`paged_slots.check_slots`)."""
        return check_slots(slots, self.geometry.num_slots, num_tokens, unique)

    def check_spec(self, spec: KVSpec) -> None:
        """Raise unless this cache holds KV that ``spec`` describes (layers, heads, dim, dtype, layout).

        Raises:
            ShapeMismatch: layer count, kv heads, head dim or MLA-ness differ.
            DTypeMismatch: the dtype differs.
        """
        g = self.geometry
        if (spec.layout == "mla_latent") != g.is_mla:
            raise ShapeMismatch(f"spec layout {spec.layout!r} does not fit paged layout {self.layout.name!r}")
        got = (g.num_layers, g.num_kv_heads, g.head_dim)
        want = (spec.num_layers, spec.num_kv_heads, spec.head_dim)
        if got != want:
            raise ShapeMismatch(f"pages hold (layers, kv heads, head dim) {got}, the spec says {want}")
        if PAGE_DTYPES[self.dtype] != spec.dtype:
            raise DTypeMismatch(f"pages hold {PAGE_DTYPES[self.dtype]}, the spec says {spec.dtype}")

    def check_chunk(self, chunk: torch.Tensor, what: str = "chunk", *, layer: bool = False) -> int:
        """Check a chunk (or one layer of it) against this cache; returns its token count.

        Raises:
            ShapeMismatch: wrong rank, layer count or per-token shape.
            DTypeMismatch: another dtype than the pages.
            InvalidInput: another device, or not contiguous.
        """
        g = self.geometry
        want = g.layer_chunk_shape(0) if layer else g.chunk_shape(0)
        tok = (0 if g.is_mla else 1) + (0 if layer else 1)
        shape = tuple(chunk.shape)
        if len(shape) != len(want):
            raise ShapeMismatch(f"{what} has shape {shape}; wants {_describe(want, tok)}")
        if not layer and shape[0] != g.num_layers:
            raise ShapeMismatch(f"{what} has {shape[0]} layers, the cache {g.num_layers}")
        if shape[:tok] + shape[tok + 1 :] != want[:tok] + want[tok + 1 :]:
            raise ShapeMismatch(f"{what} has shape {shape}; wants {_describe(want, tok)}")
        if chunk.dtype != self.dtype:
            raise DTypeMismatch(f"{what} holds {chunk.dtype}, the pages {self.dtype}")
        if chunk.device != self.device:
            raise InvalidInput(f"{what} is on {chunk.device}, the pages on {self.device}")
        if not chunk.is_contiguous():
            raise InvalidInput(f"{what} must be C-contiguous")
        return shape[tok]


def _describe(shape: tuple[int, ...], token_axis: int) -> str:
    dims = [str(n) for n in shape]
    dims[token_axis] = "tokens"
    return "[" + ", ".join(dims) + "]"


def word_size(byte_counts: Sequence[int], limit: int = 16) -> int:
    """The largest power of two up to ``limit`` dividing every count (row bytes, offsets, addresses)."""
    g = 0
    for n in byte_counts:
        g = math.gcd(g, n)
    w = limit
    while w > 1 and g % w:
        w //= 2
    return w
