"""The GPU tier: chunks in one device-memory arena owned by the tier.

The arena is a single ``torch.uint8`` CUDA tensor allocated once (no
per-chunk ``cudaMalloc``); copies run on a dedicated CUDA stream and are
synchronised before a put or get returns. Checksums are not computed on the
device: a chunk gets its checksum when it is written to a host tier.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kvstore.buffers import U8
from kvstore.errors import InvalidInput
from kvstore.keys import ChunkKey
from kvstore.tiers.arena import Extent
from kvstore.tiers.base import register_tier
from kvstore.tiers.memory import Clock, MemoryTier, _Entry
from kvstore.tiers.policies import make_policy, policy_names

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class GPUTierConfig:
    """Configuration of the GPU tier.

    Attributes:
        capacity_bytes: size of the device arena; the tier's byte budget.
        device: CUDA device, e.g. ``cuda:0``.
        policy: eviction policy name.
        ttl_s: lifetime under the ``ttl`` policy.
        alignment: extent alignment in bytes (a power of two; 256 suits DMA).
        max_chunk_bytes: the largest chunk accepted (default: the budget).
    """

    capacity_bytes: int
    device: str = "cuda:0"
    policy: str = "lru"
    ttl_s: float | None = None
    alignment: int = 256
    max_chunk_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.capacity_bytes <= 0:
            raise InvalidInput("capacity_bytes must be > 0")
        if not self.device.startswith("cuda"):
            raise InvalidInput(f"the GPU tier needs a CUDA device, got {self.device!r}")
        if self.policy not in policy_names():
            raise InvalidInput(f"unknown eviction policy {self.policy!r}; known: {policy_names()}")


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class GPUTier(MemoryTier):
    """Chunks in device memory. Accepts host arrays or tensors on any device."""

    kind = "gpu"

    def __init__(self, config: GPUTierConfig, name: str = "gpu", clock: Clock = time.monotonic) -> None:
        if not cuda_available():
            raise InvalidInput("the GPU tier needs CUDA, which is not available")
        import torch

        super().__init__(
            name,
            config.capacity_bytes,
            make_policy(config.policy, config.ttl_s),
            config.alignment,
            config.max_chunk_bytes,
            clock,
        )
        self.config = config
        self._torch = torch
        self._device = torch.device(config.device)
        self._arena = torch.empty(self._alloc.capacity, dtype=torch.uint8, device=self._device)
        self._stream = torch.cuda.Stream(device=self._device)  # type: ignore[no-untyped-call]

    def _as_tensor(self, data: Any) -> "torch.Tensor":
        import torch

        if isinstance(data, torch.Tensor):
            flat: torch.Tensor = data.reshape(-1).view(torch.uint8)
            return flat
        host: torch.Tensor = torch.from_numpy(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        return host

    def _copy_in(self, extent: Extent, data: U8) -> bytes:
        src = self._as_tensor(data)
        with self._torch.cuda.stream(self._stream):
            self._arena[extent.offset : extent.offset + src.numel()].copy_(src, non_blocking=True)
        self._stream.synchronize()
        return b""

    def _copy_out(self, extent: Extent, nbytes: int, out: U8) -> None:
        dst = self._as_tensor(out)[:nbytes]
        with self._torch.cuda.stream(self._stream):
            dst.copy_(self._arena[extent.offset : extent.offset + nbytes], non_blocking=True)
        self._stream.synchronize()

    def view(self, key: ChunkKey) -> U8 | None:
        """Host copy of a chunk (device memory has no numpy view)."""
        got = self.read(key)
        return None if got is None else got[0]

    def device_view(self, key: ChunkKey) -> "torch.Tensor | None":
        """The chunk's bytes in device memory, for a caller that pinned it."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            off = entry.extent.offset
            return self._arena[off : off + entry.meta.nbytes]

    def _peek(self, entry: _Entry) -> U8 | None:
        off = entry.extent.offset
        host: U8 = self._arena[off : off + entry.meta.nbytes].cpu().numpy()
        return host


register_tier("gpu", GPUTier)
