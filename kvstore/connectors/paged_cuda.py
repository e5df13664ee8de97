"""Paged gather/scatter with the CUDA kernels of ``kernels/paged.cu``, through CuPy.

:class:`KernelMover` turns a transfer into one launch of ``paged_gather`` or
``paged_scatter``: a table of the layers' base addresses, the slots and the
chunk, all on the cache's device, and the cache's :class:`RowMap` in words
of the widest size (16, 8, 4, 2 or 1 bytes) that divides a row and every
address. It writes exactly what :class:`~kvstore.connectors.paged_torch.TorchMover`
writes (tests/connectors/test_paged_kernels.py: bit for bit on a GPU, and
through a CPU build of the same source everywhere).

CuPy is optional (``pip install kvstore[gpu]``) and imported only when a
:class:`CupyLauncher` is made. Kernels run on torch's current CUDA stream, so
they are ordered with the engine's own work and the temporaries they read
stay valid until they have run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import torch

from kvstore.connectors.paged_cache import PagedKVCache, word_size
from kvstore.connectors.paged_torch import PagedMover
from kvstore.errors import InvalidInput

KERNEL_SOURCE: Final = Path(__file__).with_name("kernels") / "paged.cu"
KERNELS: Final = ("paged_gather", "paged_scatter")
#: argument kinds of both kernels: u address (64-bit), q int64, i int32
SIGNATURE: Final = "uuuqqqqqqqqqqi"


class KernelLauncher(Protocol):
    """Runs one kernel of ``paged.cu`` over ``items`` work items on ``device``."""

    def launch(self, kernel: str, items: int, args: Sequence[int], device: torch.device) -> None: ...


def cupy_available() -> bool:
    """CuPy is installed and torch sees a CUDA device (no CuPy import needed to tell)."""
    return importlib.util.find_spec("cupy") is not None and torch.cuda.is_available()


class CupyLauncher:
    """The kernels compiled by NVRTC, launched on torch's current stream of the tensors' device.

    Raises (at construction):
        InvalidInput: CuPy is not installed or no CUDA device is usable.
    """

    THREADS: Final = 256
    MAX_BLOCKS: Final = 65535

    def __init__(self) -> None:
        try:
            import cupy

            cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # noqa: BLE001  # ImportError, CUDARuntimeError, driver errors...
            raise InvalidInput(f"paged CUDA kernels need CuPy and a CUDA device: {exc}") from None
        self.cp: Any = cupy
        self._modules: dict[int, Any] = {}

    def _module(self, index: int) -> Any:
        if index not in self._modules:
            self._modules[index] = self.cp.RawModule(code=KERNEL_SOURCE.read_text(), options=("-std=c++17",))
        return self._modules[index]

    def launch(self, kernel: str, items: int, args: Sequence[int], device: torch.device) -> None:
        if items <= 0:
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        typed = [
            np.uint64(a) if k == "u" else np.int64(a) if k == "q" else np.int32(a)
            for k, a in zip(SIGNATURE, args, strict=True)
        ]
        blocks = min(-(-items // self.THREADS), self.MAX_BLOCKS)
        stream = torch.cuda.current_stream(index).cuda_stream
        with self.cp.cuda.Device(index), self.cp.cuda.ExternalStream(stream):
            self._module(index).get_function(kernel)((blocks,), (self.THREADS,), tuple(typed))


class KernelMover(PagedMover):
    """One kernel launch per transfer (every layer at once)."""

    def __init__(self, launcher: KernelLauncher | None = None) -> None:
        """Args: ``launcher`` defaults to :class:`CupyLauncher` (tests pass a CPU build)."""
        self.launcher: KernelLauncher = launcher if launcher is not None else CupyLauncher()

    def gather(self, cache: PagedKVCache, slots: torch.Tensor, first: int, out: torch.Tensor) -> None:
        self._run("paged_gather", cache, slots, first, out)

    def scatter(self, cache: PagedKVCache, slots: torch.Tensor, first: int, chunk: torch.Tensor) -> None:
        self._run("paged_scatter", cache, slots, first, chunk)

    def _run(
        self, kernel: str, cache: PagedKVCache, slots: torch.Tensor, first: int, chunk: torch.Tensor
    ) -> None:
        n, tokens = chunk.shape[0], slots.numel()
        if tokens == 0:
            return
        device, rm = cache.device, cache.rowmap
        bases = [v.data_ptr() for v in cache.layers[first : first + n]]
        row_bytes = rm.run * cache.dtype.itemsize
        word = word_size([row_bytes, chunk.data_ptr(), *bases])
        per_row = row_bytes // word
        table = torch.tensor(bases, dtype=torch.int64).to(device)
        slots_d = slots.to(device=device, dtype=torch.int64).contiguous()
        strides = (rm.kv_stride, rm.block_stride, rm.token_stride, rm.head_stride)
        args = [
            table.data_ptr(),
            slots_d.data_ptr(),
            chunk.data_ptr(),
            n,
            rm.kv,
            tokens,
            rm.rows_per_token,
            per_row,
            rm.block_size,
            *(s * per_row for s in strides),
            word,
        ]
        items = n * rm.kv * tokens * rm.rows_per_token * per_row
        self.launcher.launch(kernel, items, args, device)
