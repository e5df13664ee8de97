"""The GPU tier: same results as the CPU tier. Runs only where CUDA is present."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.errors import InvalidInput
from kvstore.keys import ChunkKey, NamespaceId
from kvstore.tiers.base import ChunkMeta
from kvstore.tiers.cpu import CPUTier, CPUTierConfig
from kvstore.tiers.gpu import GPUTier, GPUTierConfig, cuda_available

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not cuda_available(), reason="no CUDA device on this machine")
META = ChunkMeta(NamespaceId(b"n" * 32), 0, b"")


def k(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(32, "big"))


def test_gpu_tier_refuses_to_start_without_cuda() -> None:
    if cuda_available():
        pytest.skip("CUDA is present")
    with pytest.raises(InvalidInput):
        GPUTier(GPUTierConfig(capacity_bytes=1 << 20))


def test_gpu_config_validation() -> None:
    with pytest.raises(ValueError):
        GPUTierConfig(capacity_bytes=1 << 20, device="cpu")
    with pytest.raises(ValueError):
        GPUTierConfig(capacity_bytes=0)


@needs_cuda
def test_gpu_round_trip_matches_cpu_tier_and_evicts() -> None:
    gen = torch.Generator().manual_seed(torch.seed() % (1 << 31))  # fresh inputs each run
    gpu = GPUTier(GPUTierConfig(capacity_bytes=4 << 20))
    cpu = CPUTier(CPUTierConfig(capacity_bytes=4 << 20))
    chunks = [torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=gen) for _ in range(6)]
    for i, c in enumerate(chunks):
        assert gpu.put(k(i), c.numpy(), META) and cpu.put(k(i), c.numpy(), META)
    s = gpu.stats()
    assert s.used_bytes <= s.capacity_bytes and s.evictions == 2
    for i in range(2, 6):
        out_gpu = torch.full((1 << 20,), 7, dtype=torch.uint8, device="cuda")  # poisoned
        out_cpu = np.full(1 << 20, 7, dtype=np.uint8)
        assert gpu.get_into(k(i), out_gpu) == 1 << 20  # type: ignore[arg-type]
        assert cpu.get_into(k(i), out_cpu) == 1 << 20
        assert torch.equal(out_gpu.cpu(), torch.from_numpy(out_cpu))
        assert torch.equal(out_gpu.cpu(), chunks[i])
    device_chunk = chunks[0].cuda()
    assert gpu.put(k(9), device_chunk, META)  # type: ignore[arg-type]
    view = gpu.device_view(k(9))
    assert view is not None and torch.equal(view.cpu(), chunks[0])
