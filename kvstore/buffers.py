"""Views of caller data (numpy arrays, torch tensors, bytes) as flat uint8 arrays.

No copies are made: a view shares memory with what the caller passed, so a
tier copies straight from or into the caller's buffer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

import numpy as np
import numpy.typing as npt

from kvstore.errors import DTypeMismatch, InvalidInput, ShapeMismatch
from kvstore.spec import KVSpec

if TYPE_CHECKING:
    import torch

U8 = npt.NDArray[np.uint8]
BufferLike = Union[bytes, bytearray, memoryview, npt.NDArray[np.generic], "torch.Tensor"]

#: torch dtype names as they appear in str(tensor.dtype) -> KVSpec dtype
_TORCH_DTYPES = {
    "torch.float32": "float32",
    "torch.float16": "float16",
    "torch.bfloat16": "bfloat16",
    "torch.float8_e4m3fn": "float8_e4m3fn",
    "torch.float8_e5m2": "float8_e5m2",
    "torch.int8": "int8",
    "torch.uint8": "uint8",
}
_NUMPY_DTYPES = {"float32": "float32", "float16": "float16", "int8": "int8", "uint8": "uint8"}


def _is_torch(obj: object) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "untyped_storage")


def dtype_name(obj: object) -> str | None:
    """The KV spec dtype name of a tensor/array, or None for raw bytes."""
    if _is_torch(obj):
        name: str | None = _TORCH_DTYPES.get(str(getattr(obj, "dtype", "")))
        return name
    if isinstance(obj, np.ndarray):
        np_name: str = obj.dtype.name
        return _NUMPY_DTYPES.get(np_name, np_name)
    return None


def as_u8(obj: BufferLike, *, writable: bool = False) -> U8:
    """A flat uint8 view of ``obj`` sharing its memory.

    Raises:
        InvalidInput: not contiguous, on a GPU, or not a buffer at all.
    """
    if _is_torch(obj):
        t = obj
        if t.device.type != "cpu":  # type: ignore[union-attr]
            raise InvalidInput(f"expected a CPU tensor, got one on {t.device}")  # type: ignore[union-attr]
        if not t.is_contiguous():  # type: ignore[union-attr]
            raise InvalidInput("tensor must be contiguous")
        return t.reshape(-1).view(__import__("torch").uint8).numpy()  # type: ignore[union-attr]
    if isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous:
            raise InvalidInput("array must be C-contiguous")
        if writable and not obj.flags.writeable:
            raise InvalidInput("output array is read-only")
        return obj.reshape(-1).view(np.uint8)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(obj, dtype=np.uint8)
        if writable and not arr.flags.writeable:
            raise InvalidInput("output buffer is read-only")
        return arr
    raise InvalidInput(f"expected bytes, a numpy array or a torch tensor, got {type(obj).__name__}")


def is_raw(obj: object) -> bool:
    """True for bytes-like objects and flat uint8 arrays/tensors: untyped chunk bytes."""
    name = dtype_name(obj)
    return name is None or (name == "uint8" and len(getattr(obj, "shape", ())) == 1)


def check_chunk(spec: KVSpec, num_tokens: int, obj: BufferLike) -> None:
    """Check that a tensor/array holds ``num_tokens`` tokens of KV for ``spec``.

    Raw bytes (bytes-like objects and 1-D uint8 arrays) are only checked for
    their length.

    Raises:
        DTypeMismatch: the tensor's dtype is not the spec's.
        ShapeMismatch: the shape (or byte length) is not the spec's chunk shape.
    """
    expected = spec.chunk_shape(num_tokens)
    name = dtype_name(obj)
    if name is not None and not is_raw(obj):
        if name != spec.dtype:
            raise DTypeMismatch(f"chunk dtype {name} does not match the namespace's {spec.dtype}")
        shape = tuple(getattr(obj, "shape", ()))
        if shape != expected:
            raise ShapeMismatch(f"chunk shape {shape} does not match the namespace's {expected}")
        return
    size = as_u8(obj).size
    if size != spec.chunk_nbytes(num_tokens):
        raise ShapeMismatch(f"chunk of {size} bytes; the namespace's chunks hold {spec.chunk_nbytes(num_tokens)}")
