"""Float formats numpy lacks (bfloat16, float8 e4m3), done with integer bit operations.

The quant codec runs on numpy: one thread per chunk, no OpenMP barriers,
so a shared CPU never stalls an encode on a descheduled worker thread
(torch's intra-op parallelism made the same code 10x slower on a busy
2-core VM); callers parallelize across chunks instead. Each conversion here
rounds to nearest, ties to even, exactly like torch's ``.to(dtype)``
(tests/codecs/test_lossless_quant.py compares them).
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
U8A = npt.NDArray[np.uint8]

FP8_MAX: Final = 448.0


def _e4m3_values() -> F32:
    """The float32 value of each e4m3fn byte: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities."""
    b = np.arange(256, dtype=np.uint32)
    exp, mant = (b >> 3) & 0xF, (b & 7).astype(np.float32)
    magnitude = np.where(
        exp == 0, mant * np.float32(2.0**-9), (1 + mant / 8) * np.exp2(exp.astype(np.float32) - 7)
    ).astype(np.float32)
    values = np.where(b & 0x80, -magnitude, magnitude).astype(np.float32)
    values[(b & 0x7F) == 0x7F] = np.nan
    return values


#: the float32 value of each e4m3fn byte (0x7F and 0xFF are NaN)
E4M3_VALUES: Final[F32] = _e4m3_values()
_E4M3_MIN_NORMAL: Final = np.float32(2.0**-6)


def bf16_to_f32(words: npt.NDArray[np.uint16]) -> F32:
    """A new float32 array of bfloat16 bit patterns (exact: bf16 is float32's top half)."""
    return (words.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(x: F32) -> npt.NDArray[np.uint16]:
    """bfloat16 bit patterns of ``x`` (round to nearest even; infinities stay infinite)."""
    u = x.view(np.uint32)
    bias = (u >> np.uint32(16)) & np.uint32(1)
    bias += np.uint32(0x7FFF)
    bias += u
    return (bias >> np.uint32(16)).astype(np.uint16)


def f32_to_e4m3(x: F32) -> U8A:
    """float8 e4m3fn bytes of ``x``, which must already lie in [-448, 448] (round to nearest even)."""
    a = np.abs(x)
    u = a.view(np.uint32)
    # normal range: round the 23-bit mantissa to 3 bits, then rebias the exponent (127 -> 7)
    normal = (u + ((u >> np.uint32(20)) & np.uint32(1)) + np.uint32(0x7FFFF)) >> np.uint32(20)
    normal -= np.uint32((127 - 7) << 3)
    # below 2^-6 e4m3 is subnormal: multiples of 2^-9 (rounding up to 8 gives the smallest normal, 0x08)
    small = a < _E4M3_MIN_NORMAL
    normal[small] = np.rint(a[small] * np.float32(512.0)).astype(np.uint32)
    sign = (x.view(np.uint32) >> np.uint32(24)) & np.uint32(0x80)
    return (normal | sign).astype(np.uint8)


def round_f16(v: F32, up: bool) -> F32:
    """``v`` rounded to a float16 value toward +inf (``up``) or -inf, as float32. |v| must be < 65504."""
    h = v.astype(np.float16)
    wrong = h.astype(np.float32) < v if up else h.astype(np.float32) > v
    toward = np.float16(np.inf if up else -np.inf)
    return np.where(wrong, np.nextafter(h, toward), h).astype(np.float32)
