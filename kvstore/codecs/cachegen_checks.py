"""Checks of a cachegen container's tables, stream table and steps, in numpy.

The C decoder makes these checks itself; the GPU path makes them here on the
host before any kernel reads an offset, so a hostile container never sends a
kernel out of bounds. Every failure raises :class:`CodecError`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from kvstore.codecs.cachegen_params import FREQ_TOTAL, NUM_SYMBOLS
from kvstore.errors import CodecError

U64 = npt.NDArray[np.uint64]


def table_offsets(
    lo: bytes | memoryview, n: bytes | memoryview, freq: bytes | memoryview, count: int, allow_profile: bool
) -> U64:
    """Each table's first entry in ``freq`` (in u16 entries), after checking every table.

    Raises:
        CodecError: wrong counts, a range past symbol 254, a profile reference without a
            profile, frequencies that are truncated, trailing or do not sum to 65536.
    """
    lo_a = np.frombuffer(lo, np.uint8).astype(np.int64)
    n_a = np.frombuffer(n, np.uint8).astype(np.int64)
    if lo_a.size != count or n_a.size != count:
        raise CodecError("cachegen table lo/n sizes do not match the channels")
    if not allow_profile and (n_a == 0).any():
        raise CodecError("a cachegen table refers to a profile that is not given")
    if ((n_a > 0) & (lo_a + n_a > NUM_SYMBOLS)).any():
        raise CodecError("a cachegen table's symbol range is past 254")
    sizes = np.where(n_a >= 2, n_a, 0)
    ends = np.cumsum(sizes)
    if len(freq) % 2 or (ends[-1] if count else 0) != len(freq) // 2:
        raise CodecError("cachegen frequency tables are truncated or have trailing bytes")
    f = np.frombuffer(freq, "<u2").astype(np.int64)
    starts = ends - sizes
    big = sizes > 0
    if big.any() and (np.add.reduceat(f, starts[big]) != FREQ_TOTAL).any():
        raise CodecError("a cachegen frequency table does not sum to 65536")
    return starts.astype(np.uint64)


def stream_ends(offsets: bytes | memoryview, count: int, data_len: int) -> npt.NDArray[np.uint32]:
    """The stream table as ends, after checking it is non-decreasing and ends at ``data_len``.

    Raises:
        CodecError: the wrong number of entries, a decrease, or another final end.
    """
    if len(offsets) != 4 * count:
        raise CodecError("cachegen stream table has the wrong number of entries")
    ends = np.frombuffer(offsets, "<u4")
    if (np.diff(ends.astype(np.int64), prepend=0) < 0).any() or (count and int(ends[-1]) != data_len):
        raise CodecError("cachegen stream table decreases or does not end at the end of the data")
    return ends


def check_qparams(qparams: bytes | memoryview, count: int, token_scale: bool = False) -> None:
    """Raise CodecError unless means are finite and steps positive normal bfloat16 numbers (below
    2^126 with format 4's step codes, so that 4 times a step is finite)."""
    words = np.frombuffer(qparams, "<u2")
    if words.size != 2 * count:
        raise CodecError("cachegen qparams have the wrong size")
    mu, step = words[:count], words[count:]
    if (
        ((mu & 0x7F80) == 0x7F80).any()
        or ((step & 0x7F80) == 0x7F80).any()
        or (step & 0x8000).any()
        or ((step & 0x7F80) == 0).any()
    ):
        raise CodecError("cachegen qparams hold a non-finite mean or a step that is not positive and normal")
    if token_scale and ((step & 0x7F80) > 0x7E00).any():
        raise CodecError("cachegen qparams hold a step too large for token step codes")
