"""Paged gather/scatter kernels for every layout and dtype, each launch poisoned and checked.

On a GPU (marker ``gpu``): the kernels on device pages == the torch path on
CPU copies, bit for bit, both directions, fresh inputs (seed printed), the
gathered chunk poisoned before each launch and the device synchronized after
it. Every run: the same launcher wrapper around the g++ build.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kvstore.connectors.paged import KernelMover
from kvstore.connectors.paged_cuda import KERNELS, CupyLauncher
from kvstore.errors import InvalidInput
from kvstore.models import torch_threads
from tests.connectors.test_paged import CASE_IDS, CASES, DTYPES, Geometry
from tests.connectors.test_paged_kernels import EmulatedLauncher, check_mover, check_on_gpu
from tests.connectors.test_paged_kernels import emulated  # noqa: F401  (fixture: the g++ build of the kernels)
from tests.gpu.checked import CheckedPagedLauncher, cpu_poison, cuda_poison, cuda_sync, fresh_seed, no_sync


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def gpu() -> CheckedPagedLauncher:
    try:
        return CheckedPagedLauncher(CupyLauncher(), cuda_poison, cuda_sync)
    except InvalidInput as exc:
        pytest.skip(f"no GPU for the paged kernels: {exc}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_emulated_kernels_through_the_checked_launcher(emulated: EmulatedLauncher, case: object) -> None:
    checked = CheckedPagedLauncher(emulated, cpu_poison, no_sync)
    seed = fresh_seed("paged emulated")
    for i, dtype in enumerate(DTYPES):
        check_mover(KernelMover(checked), case, Geometry(), dtype, seed + i)  # type: ignore[arg-type]
    assert set(checked.launches) == set(KERNELS)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gpu_kernels_every_layout_and_dtype(gpu: CheckedPagedLauncher, case: object) -> None:
    seed = fresh_seed("paged GPU")
    mover = KernelMover(gpu)
    shapes = [
        (Geometry(), 13),
        (Geometry(layers=4, blocks=64, block_size=16, heads=3, dim=64), 300),
        (Geometry(layers=3, blocks=40, block_size=32, heads=2, dim=128), 700),
        (Geometry(layers=2, blocks=30, block_size=16, heads=3, dim=5), 200),  # odd rows: narrow words
    ]
    for i, dtype in enumerate(DTYPES):
        for g, tokens in shapes:
            check_on_gpu(mover, case, g, dtype, seed + i, tokens)  # type: ignore[arg-type]
    assert set(gpu.launches) >= set(KERNELS)
    torch.cuda.synchronize()
