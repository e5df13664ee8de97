"""The GPU tier: chunks in one device-memory arena owned by the tier.

The arena is a single ``torch.uint8`` device tensor allocated once (no
per-chunk ``cudaMalloc``); its extents, pins, budget and eviction are
:class:`~kvstore.tiers.memory.MemoryTier`'s, as for the CPU tier. Copies in
and out run on the tier's own copy stream through
:class:`~kvstore.tiers.gpu_staging.StagedCopier`: directly for device tensors
and pinned host memory, through a small pool of pinned staging buffers with
double buffering for pageable host memory. A put or get returns once its
copy is complete. Checksums are not computed on the device: a chunk gets its
checksum when it is written to a host tier.

The device is a :class:`~kvstore.tiers.gpu_staging.DeviceBackend`: CUDA by
default, or :class:`~kvstore.tiers.gpu_staging.SimulatedBackend` (CPU
tensors, deferred copies) to run the same tier without a GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kvstore.buffers import U8
from kvstore.errors import InvalidInput
from kvstore.keys import ChunkKey, NamespaceId
from kvstore.tiers.arena import Extent
from kvstore.tiers.base import ChunkMeta, register_tier
from kvstore.tiers.gpu_staging import CopyStats, CudaBackend, DeviceBackend, StagedCopier, StagingPool
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
        staging_slots: pinned host staging buffers (allocated once at start).
        staging_slot_bytes: size of each; a staged copy moves in pieces of this size.
        staging_depth: slots one staged copy uses at once (2: double buffering).
    """

    capacity_bytes: int
    device: str = "cuda:0"
    policy: str = "lru"
    ttl_s: float | None = None
    alignment: int = 256
    max_chunk_bytes: int | None = None
    staging_slots: int = 4
    staging_slot_bytes: int = 8 << 20
    staging_depth: int = 2

    def __post_init__(self) -> None:
        if self.capacity_bytes <= 0:
            raise InvalidInput("capacity_bytes must be > 0")
        if not self.device.startswith("cuda"):
            raise InvalidInput(f"the GPU tier needs a CUDA device, got {self.device!r}")
        if self.policy not in policy_names():
            raise InvalidInput(f"unknown eviction policy {self.policy!r}; known: {policy_names()}")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise InvalidInput("ttl_s must be > 0")
        if self.max_chunk_bytes is not None and not 0 < self.max_chunk_bytes <= self.capacity_bytes:
            raise InvalidInput("max_chunk_bytes must be in (0, capacity_bytes]")
        if self.staging_slots < 1 or self.staging_slot_bytes < 4096:
            raise InvalidInput("the GPU tier needs staging_slots >= 1 and staging_slot_bytes >= 4096")
        if not 1 <= self.staging_depth <= self.staging_slots:
            raise InvalidInput("staging_depth must be in 1..staging_slots")


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class _TensorBytes:
    """A tensor passed to a put or get: ``size`` in bytes, as the tier core reads it from numpy arrays."""

    __slots__ = ("size", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.size = tensor.numel() * tensor.element_size()


class GPUTier(MemoryTier):
    """Chunks in device memory. Accepts host arrays or tensors on any device.

    Invariants (besides :class:`MemoryTier`'s): the arena and the staging
    pool are allocated once, here, and owned by this tier alone; every copy
    into or out of the arena has completed when the call that queued it
    returns, so a committed extent always holds its chunk's bytes.
    """

    kind = "gpu"

    def __init__(
        self,
        config: GPUTierConfig,
        name: str = "gpu",
        clock: Clock = time.monotonic,
        backend: DeviceBackend | None = None,
    ) -> None:
        """Args: ``backend`` defaults to CUDA on ``config.device``.

        Raises:
            InvalidInput: CUDA is not available (and no backend was given).
        """
        import torch

        self.backend: DeviceBackend = backend if backend is not None else CudaBackend(config.device)
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
        self._arena = self.backend.device_buffer(self._alloc.capacity)
        pool = StagingPool(self.backend, config.staging_slots, config.staging_slot_bytes)
        self._copier = StagedCopier(self.backend, pool, config.staging_depth)

    @property
    def staging(self) -> StagingPool:
        return self._copier.pool

    @property
    def copy_stats(self) -> CopyStats:
        return self._copier.stats

    def put(self, key: ChunkKey, data: U8, meta: ChunkMeta) -> bool:
        """As :meth:`MemoryTier.put`; ``data`` may also be a tensor (on the device or the host)."""
        return super().put(key, self._wrap(data), meta)

    def get_into(self, key: ChunkKey, out: U8, namespace: NamespaceId | None = None) -> int | None:
        """As :meth:`MemoryTier.get_into`; ``out`` may also be a tensor (on the device or the host)."""
        return super().get_into(key, self._wrap(out), namespace)

    def get_pinned_into(self, key: ChunkKey, out: U8, namespace: NamespaceId | None = None) -> int | None:
        return super().get_pinned_into(key, self._wrap(out), namespace)

    def _wrap(self, out: Any) -> Any:
        return _TensorBytes(out) if isinstance(out, self._torch.Tensor) else out

    def _as_tensor(self, data: Any) -> torch.Tensor:
        if isinstance(data, _TensorBytes):
            data = data.tensor
        if isinstance(data, self._torch.Tensor):
            flat: torch.Tensor = data.reshape(-1).view(self._torch.uint8)
            return flat
        arr = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if not arr.flags.writeable:  # torch wants writable memory; the tier only reads a put's source
            arr = arr.view()
            try:
                arr.flags.writeable = True  # a read-only view of writable memory (another tier's view)
            except ValueError:
                arr = arr.copy()  # truly read-only memory (bytes)
        host: torch.Tensor = self._torch.from_numpy(arr)
        return host

    def _copy_in(self, extent: Extent, data: U8) -> bytes:
        src = self._as_tensor(data)
        self._copier.copy(self._arena[extent.offset : extent.offset + src.numel()], src)
        return b""

    def _copy_out(self, extent: Extent, nbytes: int, out: U8) -> None:
        dst = self._as_tensor(out)[:nbytes]
        self._copier.copy(dst, self._arena[extent.offset : extent.offset + nbytes])

    def view(self, key: ChunkKey) -> U8 | None:
        """Host copy of a chunk (device memory has no numpy view)."""
        got = self.read(key)
        return None if got is None else got[0]

    def device_view(self, key: ChunkKey) -> torch.Tensor | None:
        """The chunk's bytes in device memory, for a caller that pinned it."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            off = entry.extent.offset
            return self._arena[off : off + entry.meta.nbytes]

    def _peek(self, entry: _Entry) -> U8 | None:
        if not self._evict_listeners:  # nobody wants the bytes: no device-to-host copy
            return None
        host = np.empty(entry.meta.nbytes, dtype=np.uint8)
        self._copy_out(entry.extent, entry.meta.nbytes, host)
        return host


register_tier("gpu", GPUTier)
