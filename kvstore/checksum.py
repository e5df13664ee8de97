"""Checksums of stored chunks: XXH3-128, computed while the bytes are copied.

Hashing each block right after copying it, while it is still in cache, makes
a checksummed copy cost about the same as a plain copy (docs/tiers.md).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import xxhash

CHECKSUM_BYTES = 16
#: block size of the interleaved copy+hash; 256 KiB fits in L2 on current CPUs
BLOCK = 256 << 10

U8 = npt.NDArray[np.uint8]


def checksum(data: U8 | memoryview | bytes) -> bytes:
    """XXH3-128 digest (16 bytes, big-endian canonical form) of ``data``."""
    return xxhash.xxh3_128_digest(data.data if isinstance(data, np.ndarray) else data)


def copy_with_checksum(src: U8, dst: U8) -> bytes:
    """Copy ``src`` into ``dst`` (same size) and return the checksum of the copy."""
    n = src.size
    if n != dst.size:
        raise ValueError(f"copy of {n} bytes into a buffer of {dst.size}")
    h = xxhash.xxh3_128()
    for off in range(0, n, BLOCK):
        d = dst[off : off + BLOCK]
        np.copyto(d, src[off : off + BLOCK])
        h.update(d.data)
    return h.digest()
