"""The CuPy kernels of ``kernels/blend.cu``: RoPE shift, KV deviation, token gather/scatter on CUDA tensors.

Loaded only where CuPy and a CUDA device are present (:func:`cupy_available`);
elsewhere the torch path of kvstore.blend.rope / kvstore.blend.select runs. A
``Launcher`` runs one kernel over a number of work items with 64-bit integer
arguments; tests drive the same source compiled as C++ (``-DBL_EMULATE``)
through a CPU launcher, so the orchestration below is checked without a GPU.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from kvstore.blend.rope import RopeSpec
from kvstore.errors import InvalidInput, ShapeMismatch

KERNEL_SOURCE = Path(__file__).with_name("kernels") / "blend.cu"
THREADS = 256


class Launcher(Protocol):
    def launch(self, kernel: str, items: int, args: Sequence[int]) -> None: ...


def cupy_available() -> bool:
    """CuPy is installed and torch sees a CUDA device."""
    return importlib.util.find_spec("cupy") is not None and torch.cuda.is_available()


class CupyLauncher:
    """``cupy.RawModule`` over the kernel source, compiled once per instance (NVRTC)."""

    def __init__(self) -> None:
        if not cupy_available():
            raise InvalidInput("the blend kernels need cupy and a CUDA device")
        import cupy

        self.cp: Any = cupy
        self.module: Any = cupy.RawModule(code=KERNEL_SOURCE.read_text(), options=("-std=c++17",))

    def launch(self, kernel: str, items: int, args: Sequence[int]) -> None:
        if items <= 0:
            return
        blocks = min((items + THREADS - 1) // THREADS, 65535)
        stream = self.cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
        with stream:
            self.module.get_function(kernel)((blocks,), (THREADS,), tuple(self.cp.int64(a) for a in args))


class BlendKernels:
    """The blend steps on float32 tensors through a launcher (CUDA tensors with CupyLauncher)."""

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher

    def shift_keys_(self, keys: torch.Tensor, delta: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
        """Rotate ``keys`` ``[..., tokens, heads, head_dim]`` in place by ``delta[token]`` positions; returns it."""
        _check_f32(keys)
        if keys.dim() < 3 or keys.shape[-1] != rope.head_dim:
            raise ShapeMismatch(f"keys must be [..., tokens, heads, {rope.head_dim}], got {tuple(keys.shape)}")
        tokens, heads = keys.shape[-3], keys.shape[-2]
        d = delta.to(device=keys.device, dtype=torch.int64).reshape(-1).expand(tokens).contiguous()
        freq = rope.inv_freq.to(device=keys.device, dtype=torch.float32).contiguous()
        rows = keys.numel() // (tokens * heads * rope.head_dim)
        self.launcher.launch("rope_shift", rows * tokens * heads * (rope.rotary_dim // 2), [
            keys.data_ptr(), d.data_ptr(), freq.data_ptr(), rows, tokens, heads, rope.head_dim, rope.rotary_dim,
            int(rope.variant == "gptj")])
        return keys

    def kv_deviation(self, fk: torch.Tensor, fv: torch.Tensor, ok: torch.Tensor, ov: torch.Tensor) -> torch.Tensor:
        """Per-token squared K/V deviation of ``[1, heads, n, d]`` tensors (as kvstore.blend.select.kv_deviation)."""
        ins = [t.reshape(t.shape[-3:]).contiguous() for t in (fk, fv, ok, ov)]
        for t in ins:
            _check_f32(t)
            if t.shape != ins[0].shape:
                raise ShapeMismatch(f"deviation of shapes {tuple(t.shape)} vs {tuple(ins[0].shape)}")
        heads, n, d = ins[0].shape
        out = torch.empty(n, dtype=torch.float32, device=ins[0].device)
        self.launcher.launch("kv_deviation", n, [*(t.data_ptr() for t in ins), out.data_ptr(), heads, n, d])
        return out

    def gather(self, src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``src[:, idx]`` of a ``[heads, total, d]`` tensor."""
        _check_f32(src)
        heads, total, d = src.shape
        i = idx.to(device=src.device, dtype=torch.int64).contiguous()
        out = torch.empty(heads, i.numel(), d, dtype=src.dtype, device=src.device)
        self.launcher.launch("gather_tokens", out.numel(), [src.data_ptr(), out.data_ptr(), i.data_ptr(),
                                                            heads, total, i.numel(), d])
        return out

    def scatter_(self, dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
        """``dst[:, idx] = src`` for ``dst`` ``[heads, total, d]``, ``src`` ``[heads, len(idx), d]``."""
        _check_f32(dst)
        _check_f32(src)
        heads, total, d = dst.shape
        i = idx.to(device=dst.device, dtype=torch.int64).contiguous()
        if tuple(src.shape) != (heads, i.numel(), d):
            raise ShapeMismatch(f"scatter of {tuple(src.shape)} into {tuple(dst.shape)} at {i.numel()} tokens")
        self.launcher.launch("scatter_tokens", src.numel(), [src.data_ptr(), dst.data_ptr(), i.data_ptr(),
                                                             heads, total, i.numel(), d])


def _check_f32(t: torch.Tensor) -> None:
    if t.dtype != torch.float32 or not t.is_contiguous():
        raise InvalidInput(f"the blend kernels take contiguous float32 tensors, got {t.dtype}")
