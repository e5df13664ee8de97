"""Undoing RoPE on keys before cachegen quantizes them (``rope_theta`` > 0), and redoing it after.

RoPE rotates each pair ``(d, d + D/2)`` of a key head by ``position * theta^(-2d/D)``
(the "rotate half" convention of Llama-family models). A channel whose
pre-rotation values sit at a steady offset becomes, after rotation, a sinusoid
over the tokens: its per-channel mean no longer removes the offset and it
costs about half a bit per value more (SmolLM2 keys: 2.83 against 3.34 bits
per value at level 1's step). cachegen therefore un-rotates every K slab by the
tokens' positions *within the chunk* (a chunk's absolute position is not
known; a constant extra rotation keeps the offsets steady), quantizes, and
rotates the decoded values back; rotations are isometries, so a pair's error
keeps its size.

The angles' (cos, sin) come from :func:`rope_table`: ``theta ** (-2d / D)``
and ``t * inv_freq`` in double precision, Python's ``math.cos`` / ``math.sin``
(the C library's, correctly rounded in practice), rounded to float32, for both
the CPU coder and the CUDA kernels, so both apply the same float32 products
(each rounded on its own) to the same table.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from kvstore.buffers import U8
from kvstore.codecs.cachegen_params import Geometry


@functools.lru_cache(maxsize=16)
def rope_table(tokens: int, head_dim: int, theta: float) -> bytes:
    """``[tokens][head_dim / 2][2]`` float32 (cos, sin) of ``t * theta ** (-2d / head_dim)``."""
    half = head_dim // 2
    inv = [theta ** (-(2.0 * d) / head_dim) for d in range(half)]
    out = np.empty((tokens, half, 2), np.float32)
    for t in range(tokens):
        for d, f in enumerate(inv):
            angle = t * f
            out[t, d, 0], out[t, d, 1] = math.cos(angle), math.sin(angle)
    return out.tobytes()


def applies(g: Geometry, theta: float) -> bool:
    """Whether keys are rotated for this geometry (``theta`` set and the layout has K slabs)."""
    return theta > 0.0 and g.kv_factor == 2


def unrotated(raw: U8 | bytes | memoryview, g: Geometry, theta: float) -> U8:
    """The chunk as float32 bytes with every K slab un-rotated (tokens before ``g.exact`` left unset)."""
    from kvstore.codecs.cachegen_coder import rangecoder

    out = np.empty(g.slabs * g.tokens * g.channels * 4, np.uint8)
    table = rope_table(g.tokens, g.head_dim, theta)
    geo = (g.slabs, g.tokens, g.exact, g.heads, g.head_dim, g.kv_factor)
    rangecoder().rope(raw, g.dtype_code, out, 2, *geo, table, False)
    return out


def rotate_into(values: U8, target: U8, g: Geometry, theta: float) -> None:
    """Write float32 ``values`` into ``target`` in the chunk's dtype, rotating every K slab back."""
    from kvstore.codecs.cachegen_coder import rangecoder

    table = rope_table(g.tokens, g.head_dim, theta)
    geo = (g.slabs, g.tokens, g.exact, g.heads, g.head_dim, g.kv_factor)
    rangecoder().rope(values, 2, target, g.dtype_code, *geo, table, True)
