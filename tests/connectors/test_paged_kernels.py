"""The CUDA kernels of kvstore/connectors/kernels/paged.cu give the torch path's bytes.

On a GPU (marker ``gpu``; CuPy + a CUDA device) every layout and dtype runs
through :class:`KernelMover` on device tensors and is compared bit for bit
with :class:`TorchMover` on CPU copies of the same pages. Without a GPU the
same source is compiled by g++ with ``-DPAGED_EMULATE`` (each kernel becomes
one CPU loop over its grid) and driven through the same :class:`KernelMover`
on CPU tensors, which checks the launch arguments, the word sizes and the
index arithmetic everywhere but on the device.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from kvstore.connectors.paged import KernelMover, PagedKVCache, TorchMover, gather, mover_for, scatter
from kvstore.connectors.paged_cuda import KERNEL_SOURCE, KERNELS, SIGNATURE, CupyLauncher
from kvstore.errors import InvalidInput
from kvstore.models import torch_threads
from tests.connectors.test_paged import (
    CASE_IDS,
    CASES,
    DTYPES,
    Case,
    Geometry,
    clone_pages,
    make_pages,
    pages_equal,
    random_bytes,
    reference_gather,
    same_bytes,
    shuffled_table,
    wrap,
)
from tests.kernel_emulation import build_emulated

POISON = 0xA5


class EmulatedLauncher:
    """The kernel source compiled as C++: a launch runs the whole grid-stride loop on the CPU."""

    def __init__(self, library: Path) -> None:
        self.lib = ctypes.CDLL(str(library))
        self.launches: list[tuple[str, int]] = []  # (kernel, word bytes)

    def launch(self, kernel: str, items: int, args: Sequence[int], device: torch.device) -> None:
        assert device.type == "cpu"
        if items <= 0:
            return
        fn = getattr(self.lib, kernel)
        fn.restype = None
        typed = [
            ctypes.c_uint64(a) if k == "u" else ctypes.c_longlong(a) if k == "q" else ctypes.c_int(a)
            for k, a in zip(SIGNATURE, args, strict=True)
        ]
        fn(*typed)
        self.launches.append((kernel, args[-1]))


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> EmulatedLauncher:
    lib = build_emulated(KERNEL_SOURCE, "PAGED_EMULATE", tmp_path_factory, strict=True)
    return EmulatedLauncher(lib)


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.full((*shape[:-1], shape[-1] * size), POISON, dtype=torch.uint8, device=device)
    return raw.view(dtype)


def check_mover(mover: KernelMover, case: Case, g: Geometry, dtype: torch.dtype, seed: int) -> None:
    """Gather into a poisoned chunk and scatter into a copy of the pages: both match the torch path."""
    pages = make_pages(case, g, dtype, seed)
    cache = wrap(case, pages, g)
    start = seed % g.block_size
    slots = cache.block_table_slots(shuffled_table(g, 5, seed), start, 5 * g.block_size - 1)
    want = reference_gather(case, pages, g, slots.tolist(), dtype)
    out = poisoned(cache.geometry.chunk_shape(len(slots)), dtype)
    assert same_bytes(gather(cache, slots, out, mover=mover), want)
    chunk = random_bytes(tuple(want.shape), dtype, torch.Generator().manual_seed(seed + 1))
    by_torch, by_kernel = clone_pages(pages), clone_pages(pages)
    scatter(wrap(case, by_torch, g), slots, chunk, mover=TorchMover())
    scatter(wrap(case, by_kernel, g), slots, chunk, mover=mover)
    assert pages_equal(by_kernel, by_torch)


# ---------------------------------------------------------------- emulated on the CPU


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_emulated_kernels_match_the_torch_path(emulated: EmulatedLauncher, case: Case) -> None:
    mover = KernelMover(emulated)
    for i, dtype in enumerate(DTYPES):
        check_mover(mover, case, Geometry(), dtype, seed=20 + i)
    assert {k for k, _ in emulated.launches} == set(KERNELS)


@pytest.mark.parametrize(
    ("dtype", "heads", "dim", "nhd_word", "hnd_word"),
    [
        (torch.bfloat16, 2, 8, 16, 16),  # rows of 32 (NHD: a token) and 16 bytes (HND: a head)
        (torch.bfloat16, 4, 4, 16, 8),
        (torch.float16, 1, 4, 8, 8),  # one head: a token is one row in both
        (torch.float32, 1, 1, 4, 4),
        (torch.bfloat16, 3, 1, 2, 2),  # 6- and 2-byte rows
        (torch.float8_e4m3fn, 3, 5, 1, 1),  # 15- and 5-byte rows
    ],
)
def test_emulated_word_sizes(
    emulated: EmulatedLauncher, dtype: torch.dtype, heads: int, dim: int, nhd_word: int, hnd_word: int
) -> None:
    """Rows move in the widest word (16 bytes down to 1) that divides them; an unaligned chunk drops further."""
    g = Geometry(heads=heads, dim=dim)
    for case, word in ((CASES[0], nhd_word), (CASES[1], hnd_word)):
        emulated.launches.clear()
        check_mover(KernelMover(emulated), case, g, dtype, seed=30)
        assert {w for _, w in emulated.launches} == {word}, case.layout
    cache = wrap(CASES[0], make_pages(CASES[0], g, dtype, seed=31), g)
    shape = cache.geometry.chunk_shape(3)
    size = torch.empty((), dtype=dtype).element_size()
    flat = torch.empty(math.prod(shape) + 1, dtype=dtype)
    out = flat[1:].view(shape)  # starts one element past an aligned address
    emulated.launches.clear()
    gather(cache, [3, 4, 5], out, mover=KernelMover(emulated))
    assert same_bytes(out, gather(cache, [3, 4, 5]))
    assert emulated.launches == [("paged_gather", min(nhd_word, size))]


def test_emulated_cross_layer_views_and_empty_ranges(emulated: EmulatedLauncher) -> None:
    g = Geometry()
    big = random_bytes(
        (g.blocks, g.layers, 2, g.block_size, g.heads, g.dim), torch.bfloat16, torch.Generator()
    )
    views = [big[:, layer].transpose(0, 1) for layer in range(g.layers)]
    cache = PagedKVCache.wrap(views, "vllm_flash_nhd")
    slots = [1, 2, 3, 33, 34, 9]
    mover = KernelMover(emulated)
    assert same_bytes(gather(cache, slots, mover=mover), gather(cache, slots))
    assert gather(cache, [], mover=mover).shape == (g.layers, 2, 0, g.heads, g.dim)
    scatter(cache, [], torch.empty((g.layers, 2, 0, g.heads, g.dim), dtype=torch.bfloat16), mover=mover)


def test_without_cupy_the_default_mover_is_torch() -> None:
    assert isinstance(mover_for(torch.device("cpu")), TorchMover)
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInput, match="CuPy and a CUDA device"):
            CupyLauncher()


# ---------------------------------------------------------------- on a GPU


@pytest.fixture(scope="module")
def gpu() -> KernelMover:
    try:
        return KernelMover(CupyLauncher())
    except InvalidInput as exc:
        pytest.skip(f"no GPU for the paged kernels: {exc}")


def to_cuda(pages: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    return [p.cuda() for p in pages] if isinstance(pages, list) else pages.cuda()


def to_cpu(pages: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    return [p.cpu() for p in pages] if isinstance(pages, list) else pages.cpu()


def check_on_gpu(
    mover: KernelMover, case: Case, g: Geometry, dtype: torch.dtype, seed: int, tokens: int
) -> None:
    """Kernels on the device == torch path on the CPU, both ways, poisoned outputs."""
    host = make_pages(case, g, dtype, seed)
    cpu_cache = wrap(case, host, g)
    dev_pages = to_cuda(host)
    dev_cache = wrap(case, dev_pages, g)
    blocks = -(-(tokens + g.block_size) // g.block_size)
    start = seed % g.block_size
    slots = cpu_cache.block_table_slots(shuffled_table(g, blocks, seed), start, start + tokens)
    want = gather(cpu_cache, slots)
    out = poisoned(tuple(want.shape), dtype, "cuda")
    gather(dev_cache, slots, out, mover=mover)
    assert same_bytes(out.cpu(), want)
    assert same_bytes(gather(dev_cache, slots, mover=TorchMover()).cpu(), want)  # torch on the device too
    chunk = random_bytes(tuple(want.shape), dtype, torch.Generator().manual_seed(seed + 1))
    by_torch = to_cuda(host)
    scatter(cpu_cache, slots, chunk)
    scatter(dev_cache, slots.cuda(), chunk.cuda(), mover=mover)
    scatter(wrap(case, by_torch, g), slots, chunk.cuda(), mover=TorchMover())
    assert pages_equal(to_cpu(dev_pages), host)
    assert pages_equal(to_cpu(by_torch), host)


def fresh_seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little") % 1_000_000
    print(f"paged GPU test seed {seed}")
    return seed


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gpu_kernels_match_the_cpu_bit_for_bit(gpu: KernelMover, case: Case) -> None:
    seed = fresh_seed()
    for i, dtype in enumerate(DTYPES):
        check_on_gpu(gpu, case, Geometry(), dtype, seed + i, tokens=13)
        check_on_gpu(
            gpu, case, Geometry(layers=4, blocks=64, block_size=16, heads=3, dim=64), dtype, seed + i, 300
        )


@pytest.mark.gpu
def test_gpu_smollm2_geometry_and_timing(gpu: KernelMover) -> None:
    """SmolLM2-135M pages (30 layers, 3 kv heads, dim 64, bf16, blocks of 16): 2048 tokens, timed."""
    g = Geometry(layers=30, blocks=512, block_size=16, heads=3, dim=64)
    for case in CASES:
        check_on_gpu(gpu, case, g, torch.bfloat16, fresh_seed(), tokens=2048)
    cache = wrap(CASES[0], to_cuda(make_pages(CASES[0], g, torch.bfloat16, seed=1)), g)
    slots = cache.block_table_slots(shuffled_table(g, 128, seed=2)).cuda()
    out = torch.empty(cache.geometry.chunk_shape(2048), dtype=torch.bfloat16, device="cuda")
    src = torch.empty_like(out)
    for _ in range(3):
        gather(cache, slots, out, mover=gpu)
    torch.cuda.synchronize()
    runs = 20
    t0 = time.perf_counter()
    for _ in range(runs):
        gather(cache, slots, out, mover=gpu)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(runs):
        out.copy_(src)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    nbytes = out.numel() * out.element_size()
    print(
        f"GPU gather {nbytes * runs / (t1 - t0) / 1e9:.1f} GB/s, copy {nbytes * runs / (t2 - t1) / 1e9:.1f} GB/s"
    )
