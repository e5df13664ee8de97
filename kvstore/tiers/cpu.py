"""The CPU tier: chunks in one host-memory arena, pinned when CUDA is present."""

from __future__ import annotations

import mmap
import os
import sys
import secrets
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from kvstore.buffers import U8
from kvstore.checksum import checksum, copy_with_checksum
from kvstore.errors import InvalidInput
from kvstore.keys import ChunkKey
from kvstore.tiers.arena import Extent
from kvstore.tiers.base import register_tier
from kvstore.tiers.memory import Clock, MemoryTier, _Entry
from kvstore.tiers.policies import make_policy, policy_names


@dataclass(frozen=True, slots=True)
class CPUTierConfig:
    """Configuration of the CPU tier.

    Attributes:
        capacity_bytes: size of the arena; the tier's byte budget.
        policy: eviction policy name (``lru``, ``lfu``, ``cost``, ``ttl``).
        ttl_s: lifetime of a chunk under the ``ttl`` policy.
        pin_memory: ``auto`` pins (page-locks) the arena when CUDA is available,
            so host<->device copies run at full speed; ``always`` requires it.
        alignment: extent alignment in bytes (a power of two).
        prefault: touch every page of the arena at start, so the first puts
            do not pay page faults (startup cost: about one memset of the arena).
        max_chunk_bytes: the largest chunk accepted (default: the budget).
        checksum: ``lazy`` (default) copies a put at memcpy speed and computes
            its XXH3-128 the first time it is needed (write-through to a lower
            tier, a read by another process), once; ``on_put`` hashes while
            copying in (about 0.9x of a plain copy on current CPUs).
        shared_memory: put the arena in a file under ``/dev/shm`` (mode 0600)
            that same-user client processes map, so a local get or put costs
            one copy (kvstore.service's shared-memory path). Removed on close.
    """

    capacity_bytes: int
    policy: str = "lru"
    ttl_s: float | None = None
    pin_memory: Literal["auto", "always", "never"] = "auto"
    alignment: int = 4096
    prefault: bool = True
    max_chunk_bytes: int | None = None
    shared_memory: bool = False
    checksum: Literal["lazy", "on_put"] = "lazy"

    def __post_init__(self) -> None:
        if self.checksum not in ("lazy", "on_put"):
            raise InvalidInput(f"checksum must be lazy or on_put, got {self.checksum!r}")
        if self.capacity_bytes <= 0:
            raise InvalidInput("capacity_bytes must be > 0")
        if self.policy not in policy_names():
            raise InvalidInput(f"unknown eviction policy {self.policy!r}; known: {policy_names()}")
        if self.pin_memory not in ("auto", "always", "never"):
            raise InvalidInput(f"pin_memory must be auto, always or never, got {self.pin_memory!r}")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise InvalidInput("ttl_s must be > 0")
        if self.max_chunk_bytes is not None and not 0 < self.max_chunk_bytes <= self.capacity_bytes:
            raise InvalidInput("max_chunk_bytes must be in (0, capacity_bytes]")


SHM_DIR = "/dev/shm"


def _shared_arena(nbytes: int) -> tuple[U8, str, mmap.mmap]:
    """A host buffer backed by a fresh 0600 file in /dev/shm, mapped shared."""
    if not os.path.isdir(SHM_DIR):
        raise InvalidInput(f"shared_memory needs {SHM_DIR}, which this system does not have")
    path = os.path.join(SHM_DIR, f"kvstore-{os.getpid()}-{secrets.token_hex(8)}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        mapping = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return np.frombuffer(mapping, dtype=np.uint8), path, mapping


def _cuda_may_be_present() -> bool:
    """Whether an NVIDIA driver is loaded (or torch already imported): only then is torch worth
    importing to ask about CUDA (the import alone costs a CPU-only daemon ~150 MiB and seconds)."""
    return "torch" in sys.modules or os.path.exists("/proc/driver/nvidia")


def _host_arena(nbytes: int, pin_memory: str) -> tuple[U8, bool]:
    """A host buffer of ``nbytes``; page-locked when asked and possible."""
    if pin_memory == "always" or (pin_memory == "auto" and _cuda_may_be_present()):
        import torch

        if torch.cuda.is_available():
            t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            return t.numpy(), True
        if pin_memory == "always":
            raise InvalidInput("pin_memory='always' needs CUDA, which is not available")
    return np.empty(nbytes, dtype=np.uint8), False


class CPUTier(MemoryTier):
    """Chunks in host memory; checksummed while copied in, or lazily (``CPUTierConfig.checksum``)."""

    kind = "cpu"

    def __init__(self, config: CPUTierConfig, name: str = "cpu", clock: Clock = time.monotonic) -> None:
        super().__init__(
            name,
            config.capacity_bytes,
            make_policy(config.policy, config.ttl_s),
            config.alignment,
            config.max_chunk_bytes,
            clock,
        )
        self.config = config
        self.shm_path: str | None = None
        self._mapping: mmap.mmap | None = None
        if config.shared_memory:
            self._buf, self.shm_path, self._mapping = _shared_arena(self._alloc.capacity)
            self.pinned = False
        else:
            self._buf, self.pinned = _host_arena(self._alloc.capacity, config.pin_memory)
        if config.prefault and not self.pinned:
            self._buf[:: 4096] = 0  # fault every page in now, not on the first puts

    def region(self, extent: Extent) -> U8:
        """A writable view of a reserved extent, for a caller that fills it before commit."""
        return self._buf[extent.offset : extent.offset + extent.size]

    def close(self) -> None:
        """Remove the shared-memory file (clients that mapped it keep their mapping)."""
        if self.shm_path is not None:
            try:
                os.unlink(self.shm_path)
            except FileNotFoundError:
                pass
            self.shm_path = None

    def _copy_in(self, extent: Extent, data: U8) -> bytes:
        n = data.size
        dst = self._buf[extent.offset : extent.offset + n]
        if self.config.checksum == "on_put":
            return copy_with_checksum(data, dst)
        np.copyto(dst, data)
        return b""

    def _hash(self, extent: Extent, nbytes: int) -> bytes:
        return checksum(self._buf[extent.offset : extent.offset + nbytes])

    def _copy_out(self, extent: Extent, nbytes: int, out: U8) -> None:
        np.copyto(out[:nbytes], self._buf[extent.offset : extent.offset + nbytes])

    def view(self, key: ChunkKey) -> U8 | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            return self._slice(entry)

    def _slice(self, entry: _Entry) -> U8:
        off = entry.extent.offset
        v = self._buf[off : off + entry.meta.nbytes]
        v.flags.writeable = False
        return v

    def _peek(self, entry: _Entry) -> U8 | None:
        return self._slice(entry)


register_tier("cpu", CPUTier)
