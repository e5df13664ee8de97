"""Launchers that poison each kernel's output before it runs and check for errors after it ran.

The kernels' own launchers (kvstore.blend.gpu, kvstore.connectors.paged_cuda,
kvstore.codecs.cachegen_gpu) launch and return. These wrappers add what the
GPU suite needs around every launch: the output region filled with ``POISON``
first (so a kernel that skips an element leaves a byte the comparison
catches), and a device-wide synchronize afterwards (so an illegal address or
a failed launch raises at the launch that caused it). ``poison`` and
``sync`` are functions, so the same wrappers run on the CPU around the g++
builds of the kernels (``ctypes.memset``, nothing to wait for).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from kvstore.codecs.cachegen_gpu import CupyBackend

POISON = 0xA5
Poison = Callable[[int, int], None]  # (address, bytes)
Sync = Callable[[], None]


def fresh_seed(what: str) -> int:
    """A seed drawn from the OS, printed so that a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little") % 1_000_000_007
    print(f"{what} seed {seed}")
    return seed


def cpu_poison(address: int, nbytes: int) -> None:
    ctypes.memset(address, POISON, nbytes)


def cuda_poison(address: int, nbytes: int) -> None:
    import cupy

    cupy.cuda.runtime.deviceSynchronize()
    cupy.cuda.runtime.memset(address, POISON, nbytes)
    cupy.cuda.runtime.deviceSynchronize()


def cuda_sync() -> None:
    """Wait for the device; a kernel's asynchronous error raises here (CUDARuntimeError)."""
    import cupy

    cupy.cuda.runtime.deviceSynchronize()
    torch.cuda.synchronize()


def no_sync() -> None:
    return None


#: blend kernel -> (index of its output address, its size in bytes from the arguments); in-place kernels absent
BLEND_OUTPUTS: dict[str, tuple[int, Callable[[Sequence[int]], int]]] = {
    "kv_deviation": (4, lambda a: a[6] * 4),  # out[n] float32
    "gather_tokens": (1, lambda a: a[3] * a[5] * a[6] * 4),  # dst[heads, n, d] float32
}


class CheckedBlendLauncher:
    """Wraps a kvstore.blend.gpu launcher; counts launches by kernel."""

    def __init__(self, inner: Any, poison: Poison, sync: Sync) -> None:
        self.inner, self.poison, self.sync = inner, poison, sync
        self.launches: dict[str, int] = {}

    def launch(self, kernel: str, items: int, args: Sequence[int]) -> None:
        if kernel in BLEND_OUTPUTS:
            at, size = BLEND_OUTPUTS[kernel]
            self.poison(args[at], size(args))
        self.inner.launch(kernel, items, args)
        self.sync()
        self.launches[kernel] = self.launches.get(kernel, 0) + 1


class CheckedPagedLauncher:
    """Wraps a kvstore.connectors.paged_cuda launcher: a gather's chunk is poisoned first."""

    def __init__(self, inner: Any, poison: Poison, sync: Sync) -> None:
        self.inner, self.poison, self.sync = inner, poison, sync
        self.launches: dict[str, int] = {}

    def launch(self, kernel: str, items: int, args: Sequence[int], device: torch.device) -> None:
        if kernel == "paged_gather" and items > 0:
            self.poison(args[2], items * args[-1])  # the chunk: one word per work item
        self.inner.launch(kernel, items, args, device)
        self.sync()
        self.launches[kernel] = self.launches.get(kernel, 0) + 1


class CheckedCupyBackend(CupyBackend):
    """cachegen's CuPy backend with every fresh device array poisoned and every launch synchronized."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: dict[str, int] = {}

    def empty(self, size: int, dtype: type[np.generic]) -> Any:
        out = super().empty(size, dtype)
        out.view(np.uint8).fill(POISON)
        return out

    def launch(self, kernel: str, items: int, *args: Any) -> None:
        super().launch(kernel, items, *args)
        self.cp.cuda.runtime.deviceSynchronize()
        self.launches[kernel] = self.launches.get(kernel, 0) + 1
