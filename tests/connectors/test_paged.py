"""Paged KV gather/scatter on the CPU: every layout and dtype against a per-token reference.

Pages of every layout are filled with random bytes (NaN and infinity
patterns included, compared byte for byte). The reference reads and writes
one token at a time through the layout's documented shape (docs/paged.md),
independently of the stride arithmetic in kvstore/connectors/paged_cache.py,
so the vectorized path (and, in test_paged_kernels.py, the CUDA kernels) is
checked against the layouts themselves. The helpers here are shared with
test_paged_kernels.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from kvstore.connectors.paged import (
    PagedKVCache,
    PagedLayout,
    gather,
    gather_layer,
    get_layout,
    layout_names,
    register_layout,
    scatter,
    scatter_layer,
)
from kvstore.errors import DTypeMismatch, InvalidInput, KVStoreError, ShapeMismatch, UnknownName
from kvstore.models import torch_threads
from kvstore.spec import KVSpec, ModelFingerprint

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2]

#: (pages, layer, kv, block, offset, slot) -> the token's [heads, dim] (or [dim] for MLA) as a view
TokenView = Callable[[object, int, int, int, int, int], torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One layout: how to allocate its pages (physical shape) and where a token lives in them."""

    layout: str
    shape: Callable[[int, int, int, int, int], tuple[int, ...]]  # (layers, blocks, bs, heads, dim)
    token: TokenView
    per_layer: bool = True
    mla: bool = False


def _l(pages: object, layer: int) -> torch.Tensor:
    assert isinstance(pages, list)
    return pages[layer]  # type: ignore[no-any-return]


def _all(pages: object) -> torch.Tensor:
    assert isinstance(pages, torch.Tensor)
    return pages


CASES = [
    Case(
        "vllm_flash_nhd",
        lambda L, n, b, h, d: (2, n, b, h, d),
        lambda p, l, k, blk, o, s: _l(p, l)[k, blk, o],
    ),
    Case(
        "vllm_flash_hnd",
        lambda L, n, b, h, d: (2, n, h, b, d),
        lambda p, l, k, blk, o, s: _l(p, l)[k, blk, :, o],
    ),
    Case(
        "flashinfer_nhd",
        lambda L, n, b, h, d: (n, 2, b, h, d),
        lambda p, l, k, blk, o, s: _l(p, l)[blk, k, o],
    ),
    Case(
        "flashinfer_hnd",
        lambda L, n, b, h, d: (n, 2, h, b, d),
        lambda p, l, k, blk, o, s: _l(p, l)[blk, k, :, o],
    ),
    Case("mla", lambda L, n, b, h, d: (n, b, d), lambda p, l, k, blk, o, s: _l(p, l)[blk, o], mla=True),
    Case(
        "sglang_layer_first",
        lambda L, n, b, h, d: (2, L, n * b, h, d),
        lambda p, l, k, blk, o, s: _all(p)[k, l, s],
        per_layer=False,
    ),
    Case(
        "sglang_page_first",
        lambda L, n, b, h, d: (2, n * b, L, h, d),
        lambda p, l, k, blk, o, s: _all(p)[k, s, l],
        per_layer=False,
    ),
    Case(
        "sglang_page_first_direct",
        lambda L, n, b, h, d: (2, n, L, b, h, d),
        lambda p, l, k, blk, o, s: _all(p)[k, blk, l, o],
        per_layer=False,
    ),
    Case(
        "sglang_page_head",
        lambda L, n, b, h, d: (2, n, h, b, L, d),
        lambda p, l, k, blk, o, s: _all(p)[k, blk, :, o, l],
        per_layer=False,
    ),
]
CASE_IDS = [c.layout for c in CASES]


def random_bytes(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A tensor of uniformly random bytes (NaN and infinity patterns included)."""
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * size), dtype=torch.uint8, generator=gen)
    return raw.view(dtype)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


@dataclass
class Geometry:
    layers: int = 3
    blocks: int = 9
    block_size: int = 4
    heads: int = 2
    dim: int = 8


def make_pages(case: Case, g: Geometry, dtype: torch.dtype, seed: int) -> torch.Tensor | list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = case.shape(g.layers, g.blocks, g.block_size, g.heads, g.dim)
    if case.per_layer:
        return [random_bytes(shape, dtype, gen) for _ in range(g.layers)]
    return random_bytes(shape, dtype, gen)


def wrap(case: Case, pages: torch.Tensor | list[torch.Tensor], g: Geometry) -> PagedKVCache:
    return PagedKVCache.wrap(pages, case.layout, page_size=g.block_size)


def clone_pages(pages: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    return [p.clone() for p in pages] if isinstance(pages, list) else pages.clone()


def _token_of(case: Case, chunk: torch.Tensor, layer: int, kv: int, t: int) -> torch.Tensor:
    return chunk[layer, t] if case.mla else chunk[layer, kv, t]


def reference_gather(
    case: Case, pages: object, g: Geometry, slots: list[int], dtype: torch.dtype
) -> torch.Tensor:
    """The chunk, one token at a time."""
    n = len(slots)
    shape = (g.layers, n, g.dim) if case.mla else (g.layers, 2, n, g.heads, g.dim)
    out = torch.empty(shape, dtype=dtype)
    for layer in range(g.layers):
        for kv in range(1 if case.mla else 2):
            for t, slot in enumerate(slots):
                blk, off = divmod(slot, g.block_size)
                _token_of(case, out, layer, kv, t).copy_(case.token(pages, layer, kv, blk, off, slot))
    return out


def reference_scatter(case: Case, pages: object, g: Geometry, slots: list[int], chunk: torch.Tensor) -> None:
    """Write ``chunk`` into ``pages``, one token at a time."""
    for layer in range(g.layers):
        for kv in range(1 if case.mla else 2):
            for t, slot in enumerate(slots):
                blk, off = divmod(slot, g.block_size)
                case.token(pages, layer, kv, blk, off, slot).copy_(_token_of(case, chunk, layer, kv, t))


def pages_equal(a: torch.Tensor | list[torch.Tensor], b: torch.Tensor | list[torch.Tensor]) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_bytes(x, y) for x, y in zip(a, b))
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    return same_bytes(a, b)


def shuffled_table(g: Geometry, blocks: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [int(b) for b in torch.randperm(g.blocks, generator=gen)[:blocks]]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def request_slots(g: Geometry, seed: int) -> tuple[list[int], int, int]:
    """A shuffled 5-block table and a range starting and ending inside a block."""
    return shuffled_table(g, 5, seed), 3, 5 * g.block_size - 2


def naive_slots(table: list[int], block_size: int, start: int, end: int) -> list[int]:
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


# ---------------------------------------------------------------- every layout, every dtype


def test_every_registered_layout_has_a_case() -> None:
    assert sorted(CASE_IDS) == layout_names()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gather_matches_the_per_token_reference(case: Case, dtype: torch.dtype) -> None:
    g = Geometry()
    pages = make_pages(case, g, dtype, seed=1)
    before = clone_pages(pages)
    cache = wrap(case, pages, g)
    table, start, end = request_slots(g, seed=2)
    slots = cache.block_table_slots(table, start, end)
    assert slots.tolist() == naive_slots(table, g.block_size, start, end)
    want = reference_gather(case, pages, g, slots.tolist(), dtype)
    chunk = gather(cache, slots)
    assert chunk.is_contiguous() and chunk.dtype == dtype
    assert same_bytes(chunk, want)
    assert same_bytes(gather(cache, slots.tolist()), want)  # a plain list works as a slot mapping
    out = torch.empty_like(want)
    assert gather(cache, slots, out) is out and same_bytes(out, want)
    assert pages_equal(pages, before)  # gathering never writes the pages


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_scatter_writes_exactly_the_slots_and_round_trips(case: Case, dtype: torch.dtype) -> None:
    g = Geometry()
    pages = make_pages(case, g, dtype, seed=3)
    expected = clone_pages(pages)
    cache = wrap(case, pages, g)
    table, start, end = request_slots(g, seed=4)
    slots = cache.block_table_slots(table, start, end)
    shape = cache.geometry.chunk_shape(len(slots))
    chunk = random_bytes(shape, dtype, torch.Generator().manual_seed(5))
    scatter(cache, slots, chunk)
    reference_scatter(case, expected, g, slots.tolist(), chunk)
    assert pages_equal(pages, expected)  # the slots hold the chunk, every other byte is unchanged
    assert same_bytes(gather(cache, slots), chunk)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_layer_by_layer_matches_all_layers(case: Case) -> None:
    g = Geometry()
    pages = make_pages(case, g, torch.bfloat16, seed=6)
    cache = wrap(case, pages, g)
    slots = cache.block_table_slots(shuffled_table(g, 3, seed=7), 1, 11)
    full = gather(cache, slots)
    for layer in range(g.layers):
        assert same_bytes(gather_layer(cache, slots, layer), full[layer])
    new = random_bytes(tuple(full.shape), torch.bfloat16, torch.Generator().manual_seed(8))
    scatter_layer(cache, slots, 1, new[1])
    after = gather(cache, slots)
    assert same_bytes(after[1], new[1])
    assert same_bytes(after[0], full[0]) and same_bytes(after[2], full[2])


# ---------------------------------------------------------------- block tables and slots


@pytest.mark.parametrize(
    ("start", "end"), [(0, 20), (0, 1), (5, 6), (3, 17), (4, 8), (7, 9), (19, 20), (6, 6), (0, 0)]
)
def test_block_table_ranges_inside_and_across_blocks(start: int, end: int) -> None:
    g = Geometry()
    case = CASES[0]
    pages = make_pages(case, g, torch.float16, seed=9)
    cache = wrap(case, pages, g)
    table = shuffled_table(g, 5, seed=10)
    slots = cache.block_table_slots(table, start, end)
    assert slots.tolist() == naive_slots(table, g.block_size, start, end)
    chunk = gather(cache, slots)
    assert tuple(chunk.shape) == (g.layers, 2, end - start, g.heads, g.dim)
    assert same_bytes(chunk, reference_gather(case, pages, g, slots.tolist(), torch.float16))
    assert cache.block_table_slots(table).tolist() == naive_slots(table, g.block_size, 0, 20)


def test_slot_mapping_and_block_table_agree_and_gather_may_repeat_slots() -> None:
    g = Geometry()
    case = CASES[2]
    cache = wrap(case, make_pages(case, g, torch.bfloat16, seed=11), g)
    table = [8, 0, 3]
    mapping = torch.tensor([33, 34, 35, 0, 1, 2, 3, 12], dtype=torch.int32)  # vLLM hands int32 / int64
    assert torch.equal(cache.block_table_slots(table, 1, 9), mapping.long())
    repeated = gather(cache, [5, 5, 7])
    assert same_bytes(repeated[:, :, 0], repeated[:, :, 1])


@pytest.mark.parametrize(
    "slots",
    [
        [2, 3, 4, 5, 6, 7, 8, 9, 10],  # from inside a block, across two boundaries
        [4, 5, 6, 7, 20, 21, 22, 23],  # whole blocks
        [0, 1, 2, 5, 4, 13, 6, 7],  # any order
        [35, 0],
        [5, 5, 6, 7, 5],  # repeats (gather only)
    ],
)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_any_slot_mapping(case: Case, slots: list[int]) -> None:
    g = Geometry()
    pages = make_pages(case, g, torch.float32, seed=17)
    cache = wrap(case, pages, g)
    if len(set(slots)) == len(slots):
        chunk = random_bytes(cache.geometry.chunk_shape(len(slots)), torch.float32, torch.Generator())
        expected = clone_pages(pages)
        scatter(cache, slots, chunk)
        reference_scatter(case, expected, g, slots, chunk)
        assert pages_equal(pages, expected)
    assert same_bytes(gather(cache, slots), reference_gather(case, pages, g, slots, torch.float32))


def test_sglang_page_size_maps_page_tables() -> None:
    g = Geometry()
    case = next(c for c in CASES if c.layout == "sglang_page_first")
    pages = make_pages(case, g, torch.bfloat16, seed=12)
    by_slot = PagedKVCache.wrap(pages, "sglang_page_first")  # page size 1: a slot is a page
    by_page = PagedKVCache.wrap(pages, "sglang_page_first", page_size=g.block_size)
    slots = by_page.block_table_slots([2, 6], 1, 7)
    assert slots.tolist() == naive_slots([2, 6], g.block_size, 1, 7)
    assert torch.equal(by_slot.block_table_slots([2, 6], 1, 7, block_size=g.block_size), slots)
    assert same_bytes(gather(by_slot, slots), gather(by_page, slots))


# ---------------------------------------------------------------- views engines register


@pytest.mark.parametrize("layout", ["vllm_flash_hnd", "flashinfer_hnd"])
@pytest.mark.parametrize("heads", [2, 4])  # 4 == block_size: the shape alone cannot tell NHD from HND
def test_hnd_caches_as_vllm_registers_them(layout: str, heads: int) -> None:
    """vLLM allocates HND memory and registers it permuted to its NHD logical shape."""
    g = Geometry(heads=heads)
    case = next(c for c in CASES if c.layout == layout)
    physical = make_pages(case, g, torch.bfloat16, seed=13)
    assert isinstance(physical, list)
    logical = [p.permute(0, 1, 3, 2, 4) for p in physical]  # stride order (0, 1, 3, 2, 4) undone
    slots = [5, 6, 7, 8, 30, 2]
    want = reference_gather(case, physical, g, slots, torch.bfloat16)
    for pages, name in [(physical, layout), (logical, layout), (logical, layout.replace("hnd", "nhd"))]:
        cache = PagedKVCache.wrap(pages, name)
        assert cache.geometry.num_kv_heads == heads and cache.geometry.block_size == g.block_size
        assert same_bytes(gather(cache, slots), want), name


def test_cross_layer_allocation_and_per_layer_slices() -> None:
    """Per-layer views of one allocation (block stride spans every layer) work in place."""
    g = Geometry()
    big = random_bytes(
        (g.blocks, g.layers, 2, g.block_size, g.heads, g.dim), torch.float16, torch.Generator()
    )
    views = [big[:, layer].transpose(0, 1) for layer in range(g.layers)]  # (2, blocks, bs, heads, dim)
    cache = PagedKVCache.wrap(views, "vllm_flash_nhd")
    contiguous = [v.contiguous() for v in views]
    slots = [1, 2, 3, 33, 34, 9]
    assert same_bytes(gather(cache, slots), gather(PagedKVCache.wrap(contiguous, "vllm_flash_nhd"), slots))
    chunk = random_bytes((g.layers, 2, len(slots), g.heads, g.dim), torch.float16, torch.Generator())
    scatter(cache, slots, chunk)
    reference_scatter(CASES[0], contiguous, g, slots, chunk)
    assert all(same_bytes(v, c) for v, c in zip(views, contiguous))


def test_a_new_layout_is_data() -> None:
    """A layout whose K and V share the last axis, ``[blocks, heads, block_size, 2 * dim]`` unflattened."""
    layout = PagedLayout("heads_tokens_kv", ("block", "head", "token", "kv", "dim"), source="a test")
    with pytest.raises(InvalidInput, match="already registered"):
        register_layout(get_layout("mla"))
    g = Geometry()
    packed = random_bytes((g.blocks, g.heads, g.block_size, 2 * g.dim), torch.bfloat16, torch.Generator())
    cache = PagedKVCache.wrap([packed.unflatten(-1, (2, g.dim))], layout)
    chunk = gather(cache, [4, 5, 6])
    for t, slot in enumerate([4, 5, 6]):
        blk, off = divmod(slot, g.block_size)
        assert same_bytes(chunk[0, 0, t], packed[blk, :, off, : g.dim])
        assert same_bytes(chunk[0, 1, t], packed[blk, :, off, g.dim :])


def test_mla_chunks_are_the_spec_layout() -> None:
    g = Geometry(dim=12)
    case = next(c for c in CASES if c.layout == "mla")
    cache = wrap(case, make_pages(case, g, torch.bfloat16, seed=14), g)
    spec = KVSpec(ModelFingerprint("deepseek-like"), g.layers, 1, g.dim, "bfloat16", layout="mla_latent")
    cache.check_spec(spec)
    chunk = gather(cache, [0, 1, 2, 3, 4])
    assert tuple(chunk.shape) == spec.chunk_shape(5)
    assert chunk.numel() * chunk.element_size() == spec.chunk_nbytes(5)


def test_check_spec() -> None:
    g = Geometry()
    cache = wrap(CASES[0], make_pages(CASES[0], g, torch.bfloat16, seed=15), g)
    fp = ModelFingerprint("m")
    cache.check_spec(KVSpec(fp, g.layers, g.heads, g.dim, "bfloat16"))
    with pytest.raises(ShapeMismatch, match="layers"):
        cache.check_spec(KVSpec(fp, g.layers + 1, g.heads, g.dim, "bfloat16"))
    with pytest.raises(ShapeMismatch):
        cache.check_spec(KVSpec(fp, g.layers, g.heads + 1, g.dim, "bfloat16"))
    with pytest.raises(DTypeMismatch):
        cache.check_spec(KVSpec(fp, g.layers, g.heads, g.dim, "float8_e4m3fn"))
    with pytest.raises(ShapeMismatch):
        cache.check_spec(KVSpec(fp, g.layers, 1, g.dim, "bfloat16", layout="mla_latent"))


# ---------------------------------------------------------------- errors


def nhd_cache(g: Geometry | None = None) -> tuple[PagedKVCache, Geometry]:
    g = g or Geometry()
    return wrap(CASES[0], make_pages(CASES[0], g, torch.bfloat16, seed=16), g), g


def test_wrap_refuses_what_is_not_that_layout() -> None:
    g = Geometry()
    good = [torch.zeros(2, g.blocks, g.block_size, g.heads, g.dim, dtype=torch.bfloat16) for _ in range(2)]
    with pytest.raises(UnknownName):
        PagedKVCache.wrap(good, "vllm_flash_xyz")
    with pytest.raises(ShapeMismatch, match="5-d"):
        PagedKVCache.wrap([t[0] for t in good], "vllm_flash_nhd")
    with pytest.raises(ShapeMismatch, match="size 2"):
        PagedKVCache.wrap(good, "flashinfer_nhd")  # axis 1 is the block size (4), not K/V
    with pytest.raises(ShapeMismatch, match="layer 1"):
        PagedKVCache.wrap([good[0], good[1][:, :-1]], "vllm_flash_nhd")
    with pytest.raises(DTypeMismatch, match="layer 1"):
        PagedKVCache.wrap([good[0], good[1].half()], "vllm_flash_nhd")
    with pytest.raises(DTypeMismatch):
        PagedKVCache.wrap([good[0].double()], "vllm_flash_nhd")
    with pytest.raises(InvalidInput, match="list"):
        PagedKVCache.wrap(good[0], "vllm_flash_nhd")
    with pytest.raises(InvalidInput, match="one tensor"):
        PagedKVCache.wrap(good, "sglang_page_first")
    with pytest.raises(InvalidInput):
        PagedKVCache.wrap([], "vllm_flash_nhd")
    with pytest.raises(ShapeMismatch, match="contiguous"):
        PagedKVCache.wrap([good[0][..., ::2]], "vllm_flash_nhd")
    with pytest.raises(InvalidInput, match="overlap"):
        PagedKVCache.wrap(
            [good[0][:, :1].expand(2, g.blocks, g.block_size, g.heads, g.dim)], "vllm_flash_nhd"
        )
    sglang = torch.zeros(2, 10, 3, g.heads, g.dim, dtype=torch.bfloat16)
    with pytest.raises(InvalidInput, match="page_size"):
        PagedKVCache.wrap(sglang, "sglang_page_first", page_size=4)
    with pytest.raises(ShapeMismatch):
        PagedKVCache.wrap(sglang[0], "sglang_page_first")


def test_block_tables_out_of_range() -> None:
    cache, g = nhd_cache()
    with pytest.raises(InvalidInput, match=f"block id {g.blocks}"):
        cache.block_table_slots([1, g.blocks], 0, 8)
    with pytest.raises(InvalidInput, match="block id -1"):
        cache.block_table_slots([-1, 2], 0, 2)
    cache.block_table_slots([1, g.blocks], 0, g.block_size)  # blocks past the range are not read
    with pytest.raises(InvalidInput, match="covers 8 tokens"):
        cache.block_table_slots([1, 2], 0, 9)
    with pytest.raises(InvalidInput, match="start <= end"):
        cache.block_table_slots([1, 2], 5, 4)
    with pytest.raises(InvalidInput):
        cache.block_table_slots([1, 2], -1, 4)
    with pytest.raises(InvalidInput, match="integers"):
        cache.block_table_slots(torch.tensor([1.0, 2.0]), 0, 4)
    with pytest.raises(InvalidInput, match="one-dimensional"):
        cache.block_table_slots(torch.tensor([[1, 2]]), 0, 4)
    with pytest.raises(InvalidInput, match="divide"):
        cache.block_table_slots([1], 0, 1, block_size=5)


def test_slot_mappings_of_the_wrong_length_or_range() -> None:
    cache, g = nhd_cache()
    chunk = torch.zeros(cache.geometry.chunk_shape(3), dtype=torch.bfloat16)
    with pytest.raises(ShapeMismatch, match="2 slots for a chunk of 3"):
        scatter(cache, [1, 2], chunk)
    with pytest.raises(ShapeMismatch, match="4 slots"):
        gather(cache, [1, 2, 3, 4], out=torch.empty_like(chunk))
    with pytest.raises(InvalidInput, match=f"slot {g.blocks * g.block_size} is out of range"):
        gather(cache, [0, g.blocks * g.block_size])
    with pytest.raises(InvalidInput, match="slot -3"):
        scatter(cache, [0, -3, 1], chunk)
    with pytest.raises(InvalidInput, match="repeats"):
        scatter(cache, [4, 5, 4], chunk)
    with pytest.raises(InvalidInput, match="integers"):
        gather(cache, torch.tensor([0.0, 1.0]))


def test_chunks_that_do_not_fit() -> None:
    cache, g = nhd_cache()
    slots = [0, 1, 2]
    shape = cache.geometry.chunk_shape(3)
    with pytest.raises(ShapeMismatch, match=f"{g.layers - 1} layers, the cache {g.layers}"):
        scatter(cache, slots, torch.zeros((g.layers - 1, *shape[1:]), dtype=torch.bfloat16))
    with pytest.raises(ShapeMismatch, match="wants"):
        scatter(cache, slots, torch.zeros((g.layers, 2, 3, g.heads + 1, g.dim), dtype=torch.bfloat16))
    with pytest.raises(ShapeMismatch):
        scatter(cache, slots, torch.zeros((g.layers, 2, 3, g.heads * g.dim), dtype=torch.bfloat16))
    with pytest.raises(DTypeMismatch):
        scatter(cache, slots, torch.zeros(shape, dtype=torch.float16))
    with pytest.raises(DTypeMismatch):
        gather(cache, slots, out=torch.zeros(shape, dtype=torch.float32))
    with pytest.raises(InvalidInput, match="contiguous"):
        scatter(
            cache, slots, torch.zeros((g.layers, 2, g.heads, 3, g.dim), dtype=torch.bfloat16).transpose(2, 3)
        )
    with pytest.raises(InvalidInput, match="layer 3"):
        gather_layer(cache, slots, g.layers)
    with pytest.raises(ShapeMismatch):
        scatter_layer(cache, slots, 0, torch.zeros(shape, dtype=torch.bfloat16))


def test_a_refused_scatter_writes_nothing() -> None:
    cache, _ = nhd_cache()
    before = [t.clone() for t in cache.layers]
    chunk = torch.ones(cache.geometry.chunk_shape(3), dtype=torch.bfloat16)
    for slots in ([0, 1, 10_000], [0, 1, 1]):
        with pytest.raises(InvalidInput):
            scatter(cache, slots, chunk)
    assert all(same_bytes(a, b) for a, b in zip(cache.layers, before))


def test_errors_are_kvstore_value_errors() -> None:
    for exc in (ShapeMismatch, DTypeMismatch, InvalidInput):
        assert issubclass(exc, KVStoreError) and issubclass(exc, ValueError)
    assert issubclass(UnknownName, KVStoreError)
    with pytest.raises(InvalidInput):
        PagedLayout("bad", ("kv", "block", "token", "dim", "head"))
    with pytest.raises(InvalidInput):
        PagedLayout("bad", ("kv", "block", "slot", "head", "dim"))
    with pytest.raises(InvalidInput):
        PagedLayout("bad", ("kv", "block", "token", "dim"))
    assert get_layout("mla").is_mla and get_layout("sglang_page_first").all_layers


# ---------------------------------------------------------------- coalesced copies on the CPU


@pytest.mark.parametrize(
    ("rows", "group"),
    [
        ([8, 9, 10, 11, 0, 1, 2, 3], 4),  # two aligned runs of 4
        ([8, 9, 10, 11, 12, 13, 14, 15], 8),  # adjacent blocks merge into one run
        ([2, 3, 4, 5], 2),  # a run starting at 2 is aligned to 2 only
        ([1, 2, 3, 4], 1),  # misaligned: row by row
        ([0, 1, 0, 1], 2),  # a repeated run
        ([5, 5], 1),
        ([7], 1),
        ([], 1),
    ],
)
def test_coalesce_groups_aligned_runs(rows: list[int], group: int) -> None:
    from kvstore.connectors.paged_torch import coalesce

    got_group, items = coalesce(np.asarray(rows, dtype=np.int64))
    assert got_group == group
    expanded = [int(item) * group + i for item in items for i in range(group)]
    assert expanded == rows


@pytest.mark.parametrize("case", [c for c in CASES if c.layout in ("vllm_flash_nhd", "mla")], ids=lambda c: c.layout)
def test_block_aligned_transfers_move_whole_blocks(case: Case) -> None:
    """A block-aligned range of a token-major layout is copied a block at a time, and still exactly."""
    from kvstore.connectors.paged_torch import coalesce

    g = Geometry()
    pages = make_pages(case, g, torch.bfloat16, seed=31)
    cache = wrap(case, pages, g)
    table = shuffled_table(g, 3, seed=32)
    slots = cache.block_table_slots(table)
    group, _ = coalesce(cache.rowmap.rows(slots).numpy())
    assert group % g.block_size == 0
    chunk = gather(cache, slots)
    assert same_bytes(chunk, reference_gather(case, pages, g, slots.tolist(), torch.bfloat16))
    fresh = random_bytes(tuple(chunk.shape), torch.bfloat16, torch.Generator().manual_seed(33))
    expected = clone_pages(pages)
    scatter(cache, slots, fresh)
    reference_scatter(case, expected, g, slots.tolist(), fresh)
    assert pages_equal(pages, expected)
