"""The blend kernels (RoPE shift, deviation and its ranking, selective gather/scatter) against the torch path.

On a GPU (marker ``gpu``): fresh random inputs each run (seed printed),
outputs poisoned before each launch, the device synchronized and checked
after each launch. Every run: the same checks through the g++ build of the
kernels, which also proves the poisoning touches outputs only.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kvstore.blend.gpu import KERNEL_SOURCE, BlendKernels, CupyLauncher, cupy_available
from kvstore.blend.rope import RopeSpec, shift_keys
from kvstore.blend.select import kv_deviation, select_tokens
from kvstore.models import torch_threads
from tests.blend.test_kernels import EmulatedLauncher
from tests.gpu.checked import (
    POISON,
    CheckedBlendLauncher,
    cpu_poison,
    cuda_poison,
    cuda_sync,
    fresh_seed,
    no_sync,
)
from tests.kernel_emulation import build_emulated


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> CheckedBlendLauncher:
    lib = build_emulated(KERNEL_SOURCE, "BL_EMULATE", tmp_path_factory)
    return CheckedBlendLauncher(EmulatedLauncher(lib), cpu_poison, no_sync)


@pytest.fixture(scope="module")
def gpu() -> CheckedBlendLauncher:
    if not cupy_available():
        pytest.skip("no GPU for the blend kernels: needs cupy and a CUDA device")
    return CheckedBlendLauncher(CupyLauncher(), cuda_poison, cuda_sync)


def separated_deviation_inputs(
    g: torch.Generator, heads: int, n: int, d: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fresh K, fresh V, old K, old V) whose per-token deviations are >= 5% apart (a unique ranking)."""
    fk, fv = torch.randn(1, heads, n, d, generator=g), torch.randn(1, heads, n, d, generator=g)
    dk, dv = torch.randn(1, heads, n, d, generator=g), torch.randn(1, heads, n, d, generator=g)
    unit = (dk.square().sum((0, 1, 3)) + dv.square().sum((0, 1, 3))).sqrt()
    target = 1.1 ** torch.randperm(n, generator=g).float()  # distinct squared norms, ratio 1.21 apart
    scale = (target / unit).reshape(1, 1, n, 1)
    return fk, fv, fk + dk * scale, fv + dv * scale


def check_blend(launcher: CheckedBlendLauncher, device: str, seed: int) -> None:
    kernels = BlendKernels(launcher)
    g = torch.Generator().manual_seed(seed)
    for rows, tokens, heads, dim, rotary in [(3, 50, 3, 64, 64), (30, 256, 3, 64, 64), (2, 17, 2, 128, 64)]:
        keys = torch.randn(rows, tokens, heads, dim, generator=g)
        delta = torch.randint(-4000, 4000, (tokens,), generator=g)
        for variant in ("neox", "gptj"):
            std = RopeSpec.standard(rotary, 1e5, variant)  # type: ignore[arg-type]
            rope = RopeSpec(std.variant, std.inv_freq, dim, rotary)  # partial rotary where rotary < dim
            got = kernels.shift_keys_(keys.clone().to(device), delta, rope).cpu()
            torch.testing.assert_close(got, shift_keys(keys, delta, rope), atol=5e-5, rtol=1e-5)
    for heads, n, d in [(3, 40, 64), (3, 2048, 64), (1, 7, 128)]:
        ins = separated_deviation_inputs(g, heads, n, d)
        want = kv_deviation(*ins)
        got = kernels.kv_deviation(*(t.to(device) for t in ins)).cpu()
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-5)
        candidates = torch.rand(n, generator=g) < 0.8
        forced = ~candidates & (torch.rand(n, generator=g) < 0.5)
        for keep in (0, 1, n // 7, n):
            assert torch.equal(
                select_tokens(got, candidates, forced, keep), select_tokens(want, candidates, forced, keep)
            )
        src = torch.randn(heads, n, d, generator=g)
        idx = torch.randperm(n, generator=g)[: max(1, n // 5)].sort().values
        gathered = kernels.gather(src.to(device), idx).cpu()
        assert torch.equal(gathered, src[:, idx])
        dst = src.to(device)
        new = torch.randn(heads, idx.numel(), d, generator=g)
        kernels.scatter_(dst, idx, new.to(device))
        ref = src.clone()
        ref[:, idx] = new
        assert torch.equal(dst.cpu(), ref)
    assert set(launcher.launches) == {"rope_shift", "kv_deviation", "gather_tokens", "scatter_tokens"}


def test_emulated_kernels_through_the_checked_launcher(emulated: CheckedBlendLauncher) -> None:
    check_blend(emulated, "cpu", fresh_seed("blend emulated"))


def test_checked_launcher_poisons_exactly_the_output(emulated: CheckedBlendLauncher) -> None:
    class NoKernel:
        def launch(self, kernel: str, items: int, args: object) -> None:
            return None

    kernels = BlendKernels(CheckedBlendLauncher(NoKernel(), cpu_poison, no_sync))
    src = torch.randn(2, 9, 4)
    out = kernels.gather(src, torch.tensor([1, 3]))
    assert (out.view(torch.uint8) == POISON).all()
    before = src.clone()
    dev = kernels.kv_deviation(*(src.reshape(1, 2, 9, 4) for _ in range(4)))
    assert (dev.view(torch.uint8) == POISON).all() and torch.equal(src, before)


@pytest.mark.gpu
def test_gpu_kernels_match_the_torch_path(gpu: CheckedBlendLauncher) -> None:
    check_blend(gpu, "cuda", fresh_seed("blend GPU"))
