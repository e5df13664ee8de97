"""kernels/blend.cu against the torch path: emulated on the CPU (g++ -DBL_EMULATE) and on a GPU (marker ``gpu``)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from kvstore.blend.gpu import KERNEL_SOURCE, BlendKernels, CupyLauncher, cupy_available
from kvstore.blend.rope import RopeSpec, shift_keys
from kvstore.blend.select import kv_deviation
from tests.kernel_emulation import build_emulated


class EmulatedLauncher:
    """The kernel source compiled as C++: every launch is one loop on the CPU."""

    def __init__(self, library: Path) -> None:
        self.lib = ctypes.CDLL(str(library))

    def launch(self, kernel: str, items: int, args: Sequence[int]) -> None:
        fn = getattr(self.lib, kernel)
        fn.argtypes = [ctypes.c_longlong] * len(args)
        fn(*args)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> BlendKernels:
    lib = build_emulated(KERNEL_SOURCE, "BL_EMULATE", tmp_path_factory)
    return BlendKernels(EmulatedLauncher(lib))


def _check(kernels: BlendKernels, device: str) -> None:
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(3, 50, 3, 64, generator=g)
    delta = torch.randint(-500, 3000, (50,), generator=g)
    for variant in ("neox", "gptj"):
        rope = RopeSpec.standard(64, 1e5, variant)  # type: ignore[arg-type]
        got = kernels.shift_keys_(keys.clone().to(device), delta, rope).cpu()
        torch.testing.assert_close(got, shift_keys(keys, delta, rope), atol=3e-5, rtol=1e-5)
    fk, fv, ok, ov = (torch.randn(1, 3, 40, 64, generator=g).to(device) for _ in range(4))
    torch.testing.assert_close(kernels.kv_deviation(fk, fv, ok, ov).cpu(),
                               kv_deviation(fk, fv, ok, ov).cpu(), atol=1e-3, rtol=1e-5)
    src = torch.randn(3, 40, 64, generator=g).to(device)
    idx = torch.tensor([0, 5, 6, 39])
    assert torch.equal(kernels.gather(src, idx).cpu(), src[:, idx].cpu())
    dst = src.clone()
    new = torch.randn(3, 4, 64, generator=g).to(device)
    kernels.scatter_(dst, idx, new)
    ref = src.clone()
    ref[:, idx.to(device)] = new
    assert torch.equal(dst.cpu(), ref.cpu())


def test_emulated_kernels_match_the_torch_path(emulated: BlendKernels) -> None:
    _check(emulated, "cpu")


@pytest.mark.gpu
def test_cuda_kernels_match_the_torch_path() -> None:
    if not cupy_available():
        pytest.skip("no GPU for the blend kernels: needs cupy and a CUDA device")
    _check(BlendKernels(CupyLauncher()), "cuda")
