"""Paged KV layouts of inference engines, as data: the axes of the tensor an engine hands over.

A :class:`PagedLayout` names the axes of an engine's KV tensor from outermost
to innermost, in the order they are laid out in memory. Every layout is made
of the same few axes:

==========  ====================================================================
axis        meaning
==========  ====================================================================
``layer``   decoder layer (only in layouts that keep every layer in one tensor)
``kv``      K at index 0, V at index 1 (absent in MLA: one latent per token)
``block``   page (block) id of a block table
``token``   position of a token inside its block (``0 .. block_size - 1``)
``slot``    token slot of a slot-indexed pool (``block * block_size + token``)
``head``    kv head (absent in MLA)
``dim``     head dim, or the latent dim (``kv_lora_rank + qk_rope_head_dim``) of MLA
==========  ====================================================================

Engines keep some caches as a *permuted view*: vLLM allocates an HND cache in
HND memory order but registers it with its NHD logical shape
(``get_kv_cache_shape`` then ``.permute`` by ``get_kv_cache_stride_order``).
``engine_axes`` names that logical order; a tensor is read in whichever order
its strides say it is in (:func:`kvstore.connectors.paged_cache.PagedKVCache.wrap`).

The layouts below were matched against (read, never copied):

- vLLM v1 ``vllm/v1/attention/backends/flash_attn.py`` (``FlashAttentionBackend``,
  vllm-project/vllm @ 0084b783): ``get_kv_cache_shape`` =
  ``(2, num_blocks, block_size, num_kv_heads, head_size)``;
  ``get_kv_cache_stride_order`` = identity for NHD, ``(0, 1, 3, 2, 4)`` for HND.
- vLLM v1 ``vllm/v1/attention/backends/flashinfer.py`` (``FlashInferBackend``,
  vllm-project/vllm @ 00a817ad): ``(num_blocks, 2, block_size, num_kv_heads,
  head_size)``, stride order identity (NHD) or ``(0, 1, 3, 2, 4)`` (HND); the
  same two page layouts FlashInfer itself documents (NHD
  ``[pages, 2, page_size, heads, dim]``, HND ``[pages, 2, heads, page_size, dim]``).
- vLLM v1 MLA backends (``MLACommonBackend`` in
  ``vllm/v1/attention/backends/mla/common.py``, vllm-project/vllm @ 37fa5c09):
  ``(num_blocks, block_size, head_size)`` with ``head_size = kv_lora_rank +
  qk_rope_head_dim`` (576 for DeepSeek-V2/V3).
- SGLang HiCache ``MHATokenToKVPoolHost.init_kv_buffer``
  (``python/sglang/srt/mem_cache/memory_pool_host.py`` in SGLang 0.5.x, moved to
  ``mem_cache/pool_host/mha.py`` on main, sgl-project/sglang @ 0047d999):
  ``layer_first`` = ``(2, layer_num, size, head_num, head_dim)``, ``page_first``
  = ``(2, size, layer_num, head_num, head_dim)``, ``page_first_direct`` =
  ``(2, page_num, layer_num, page_size, head_num, head_dim)``, ``page_head`` =
  ``(2, page_num, head_num, page_size, layer_num, head_dim)``; ``size`` counts
  token slots (``page_num * page_size``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from kvstore.errors import InvalidInput, UnknownName

Axis = Literal["layer", "kv", "block", "token", "slot", "head", "dim"]
AXES: Final[frozenset[str]] = frozenset({"layer", "kv", "block", "token", "slot", "head", "dim"})


@dataclass(frozen=True, slots=True)
class PagedLayout:
    """The axes of an engine's paged KV tensor, outermost first, in memory order.

    Invariants: axes are unique and known; ``dim`` is the innermost axis;
    a token is addressed either by ``block`` and ``token`` or by ``slot``;
    ``kv`` and ``head`` are both present (K/V layouts) or both absent (MLA);
    ``engine_axes``, when given, is a permutation of ``axes``.
    """

    name: str
    axes: tuple[Axis, ...]
    #: the engine's logical axis order when it registers a permuted view (vLLM HND)
    engine_axes: tuple[Axis, ...] | None = None
    #: the engine and the code this layout matches
    source: str = ""

    def __post_init__(self) -> None:
        axes = self.axes
        if len(set(axes)) != len(axes) or not set(axes) <= AXES:
            raise InvalidInput(f"layout {self.name!r}: axes must be unique and among {sorted(AXES)}")
        if not axes or axes[-1] != "dim":
            raise InvalidInput(f"layout {self.name!r}: 'dim' must be the innermost axis")
        if ("slot" in axes) == ("block" in axes or "token" in axes) or ("block" in axes) != ("token" in axes):
            raise InvalidInput(f"layout {self.name!r}: tokens are addressed by block + token or by slot")
        if ("kv" in axes) != ("head" in axes):
            raise InvalidInput(f"layout {self.name!r}: 'kv' and 'head' go together (absent only for MLA)")
        if self.engine_axes is not None and sorted(self.engine_axes) != sorted(axes):
            raise InvalidInput(f"layout {self.name!r}: engine_axes must permute axes")

    @property
    def all_layers(self) -> bool:
        """One tensor holds every layer (SGLang host pools), not one tensor per layer."""
        return "layer" in self.axes

    @property
    def is_mla(self) -> bool:
        """One latent vector per token (no K/V, no heads)."""
        return "kv" not in self.axes

    @property
    def slot_indexed(self) -> bool:
        """Tokens are addressed by slot; a block table needs a page size to map to slots."""
        return "slot" in self.axes

    def layer_axes(self, axes: tuple[Axis, ...]) -> tuple[Axis, ...]:
        """``axes`` without the layer axis: the axes of one layer's view."""
        return tuple(a for a in axes if a != "layer")


_LAYOUTS: dict[str, PagedLayout] = {}


def register_layout(layout: PagedLayout) -> PagedLayout:
    """Add a layout to the registry.

    Raises:
        InvalidInput: a layout of that name is already registered.
    """
    if layout.name in _LAYOUTS:
        raise InvalidInput(f"paged layout {layout.name!r} is already registered")
    _LAYOUTS[layout.name] = layout
    return layout


def get_layout(name: str) -> PagedLayout:
    """The registered layout called ``name``.

    Raises:
        UnknownName: no layout of that name.
    """
    try:
        return _LAYOUTS[name]
    except KeyError:
        raise UnknownName(f"unknown paged layout {name!r}; known: {layout_names()}") from None


def layout_names() -> list[str]:
    return sorted(_LAYOUTS)


_VLLM_FA = "vLLM v1 FlashAttention backend"
_VLLM_FI = "vLLM v1 FlashInfer backend / FlashInfer paged KV"
_SGL = "SGLang HiCache MHATokenToKVPoolHost"

VLLM_FLASH_NHD = register_layout(
    PagedLayout("vllm_flash_nhd", ("kv", "block", "token", "head", "dim"), source=f"{_VLLM_FA}, NHD")
)
VLLM_FLASH_HND = register_layout(
    PagedLayout(
        "vllm_flash_hnd",
        ("kv", "block", "head", "token", "dim"),
        engine_axes=("kv", "block", "token", "head", "dim"),
        source=f"{_VLLM_FA}, HND (VLLM_KV_CACHE_LAYOUT=HND)",
    )
)
FLASHINFER_NHD = register_layout(
    PagedLayout("flashinfer_nhd", ("block", "kv", "token", "head", "dim"), source=f"{_VLLM_FI}, NHD")
)
FLASHINFER_HND = register_layout(
    PagedLayout(
        "flashinfer_hnd",
        ("block", "kv", "head", "token", "dim"),
        engine_axes=("block", "kv", "token", "head", "dim"),
        source=f"{_VLLM_FI}, HND",
    )
)
MLA = register_layout(
    PagedLayout(
        "mla", ("block", "token", "dim"), source="vLLM v1 MLA backends (latent kv_c + k_pe per token)"
    )
)
SGLANG_LAYER_FIRST = register_layout(
    PagedLayout("sglang_layer_first", ("kv", "layer", "slot", "head", "dim"), source=f"{_SGL} layer_first")
)
SGLANG_PAGE_FIRST = register_layout(
    PagedLayout("sglang_page_first", ("kv", "slot", "layer", "head", "dim"), source=f"{_SGL} page_first")
)
SGLANG_PAGE_FIRST_DIRECT = register_layout(
    PagedLayout(
        "sglang_page_first_direct",
        ("kv", "block", "layer", "token", "head", "dim"),
        source=f"{_SGL} page_first_direct",
    )
)
SGLANG_PAGE_HEAD = register_layout(
    PagedLayout(
        "sglang_page_head", ("kv", "block", "head", "token", "layer", "dim"), source=f"{_SGL} page_head"
    )
)
