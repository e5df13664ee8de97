"""The ``lossless`` codec: byte-shuffle by dtype itemsize, then one zstd frame.

Shuffling puts byte ``i`` of every element into plane ``i``, so a bf16
chunk becomes its low bytes (mantissa, near random) followed by its high
bytes (sign and exponent, few distinct values) and zstd finds the
redundancy of the exponents. Invariants: decoding returns the input bit for
bit (NaN payloads, infinities and -0.0 included); the one section ``zstd``
is a single zstd frame that declares exactly the chunk's byte count, so the
decoder allocates no more than the layout says.
"""

from __future__ import annotations

from typing import ClassVar, Final

import numpy as np
import numpy.typing as npt
import zstandard

from kvstore.buffers import U8
from kvstore.codecs.base import ChunkLayout, Codec, CodecParams, register_codec
from kvstore.codecs.container import Container, input_bytes, output_bytes, pack, unpack_for
from kvstore.errors import CodecError, InvalidInput

DEFAULT_LEVEL: Final = 1
#: zstd's fast negative levels down to -7, up to its maximum 22
MIN_LEVEL: Final = -7
MAX_LEVEL: Final = 22
#: window the decoder accepts (zstd's own default limit): bounds decoder memory on hostile frames
MAX_WINDOW: Final = 1 << 27
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _level(params: CodecParams, error: type[Exception]) -> int:
    unknown = set(params) - {"level"}
    if unknown:
        raise error(f"lossless takes only 'level', got {sorted(unknown)}")
    level = params.get("level", DEFAULT_LEVEL)
    if type(level) is not int or not MIN_LEVEL <= level <= MAX_LEVEL:
        raise error(f"lossless level must be an int in [{MIN_LEVEL}, {MAX_LEVEL}], got {level!r}")
    return level


def shuffle(raw: U8, itemsize: int) -> U8:
    """Byte planes of ``raw`` (``itemsize``-byte elements): plane ``i`` holds byte ``i`` of each."""
    if itemsize == 1:
        return raw
    words = raw.view(_UINT[itemsize])
    out = np.empty((itemsize, words.size), dtype=np.uint8)
    for i in range(itemsize):  # one vectorized pass per byte plane
        np.bitwise_and(np.right_shift(words, 8 * i) if i else words, 0xFF, out=out[i], casting="unsafe")
    return out.reshape(-1)


def unshuffle_into(planes: npt.NDArray[np.uint8], itemsize: int, out: U8) -> None:
    """Inverse of :func:`shuffle`, written into ``out`` (same size)."""
    if itemsize == 1:
        np.copyto(out, planes)
        return
    utype = _UINT[itemsize]
    words = out.view(utype)
    p = planes.reshape(itemsize, -1)
    np.left_shift(p[itemsize - 1], 8 * (itemsize - 1), out=words, dtype=utype)
    for i in range(itemsize - 2, -1, -1):
        if i:
            np.bitwise_or(words, np.left_shift(p[i], 8 * i, dtype=utype), out=words)
        else:
            np.bitwise_or(words, p[0], out=words)


class LosslessCodec(Codec):
    """Byte-shuffle + zstd. Params: ``level`` (int, -7..22, default 1)."""

    name: ClassVar[str] = "lossless"
    lossless: ClassVar[bool] = True

    def __init__(self, params: CodecParams | None = None) -> None:
        super().__init__(params)
        self.level = _level(self.params, InvalidInput)
        self.params = {"level": self.level}

    def encode(self, raw: U8, layout: ChunkLayout) -> bytes:
        """A container whose section ``zstd`` is the zstd frame of the shuffled chunk.

        Raises:
            InvalidInput: ``raw`` is not ``layout.nbytes`` bytes.
        """
        data = input_bytes(raw, layout)
        planes = shuffle(data, layout.spec.itemsize)
        frame = zstandard.ZstdCompressor(level=self.level, write_content_size=True).compress(planes.data)
        return pack(self.name, self.params, layout, [("zstd", frame)])

    def decode_into(self, container: bytes | memoryview | U8, out: U8) -> ChunkLayout:
        """Decompress and unshuffle into ``out``.

        Raises:
            CodecError: malformed, corrupt, not a lossless container, or a frame of the wrong size.
            InvalidInput: ``out`` is too small.
        """
        c = unpack_for(container, self.name)
        _level(c.params, CodecError)
        target = output_bytes(out, c.layout)
        planes = _decompress(c)
        unshuffle_into(planes, c.spec.itemsize, target)
        return c.layout


def _decompress(c: Container) -> npt.NDArray[np.uint8]:
    if len(c.sections) != 1:
        raise CodecError(f"lossless container has {len(c.sections)} sections, expected 1")
    frame = c.section("zstd")
    n = c.layout.nbytes
    try:
        declared = zstandard.frame_content_size(frame)
        if declared != n:
            raise CodecError(f"zstd frame declares {declared} bytes; the layout holds {n}")
        data = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).decompress(frame, max_output_size=n)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt zstd frame: {exc}") from None
    if len(data) != n:
        raise CodecError(f"zstd frame decoded to {len(data)} bytes; the layout holds {n}")
    return np.frombuffer(data, dtype=np.uint8)


register_codec(LosslessCodec.name, LosslessCodec)
