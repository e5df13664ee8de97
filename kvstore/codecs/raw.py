"""The ``raw`` codec: the chunk's bytes unchanged, in one checksummed section.

Invariants: the container's ``data`` section is exactly the input bytes, so
decoding is a checksum and a copy; any dtype and layout is accepted.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from kvstore.buffers import U8
from kvstore.codecs.base import ChunkLayout, Codec, CodecParams, register_codec
from kvstore.codecs.container import input_bytes, output_bytes, pack, unpack_for
from kvstore.errors import CodecError, InvalidInput


class RawCodec(Codec):
    """Stores the chunk as it is (no parameters)."""

    name: ClassVar[str] = "raw"
    lossless: ClassVar[bool] = True

    def __init__(self, params: CodecParams | None = None) -> None:
        super().__init__(params)
        if self.params:
            raise InvalidInput(f"codec raw takes no parameters, got {sorted(self.params)}")

    def encode(self, raw: U8, layout: ChunkLayout) -> bytes:
        """A container whose one section ``data`` is ``raw``.

        Raises:
            InvalidInput: ``raw`` is not ``layout.nbytes`` bytes.
        """
        return pack(self.name, {}, layout, [("data", input_bytes(raw, layout))])

    def decode_into(self, container: bytes | memoryview | U8, out: U8) -> ChunkLayout:
        """Copy the ``data`` section into ``out``.

        Raises:
            CodecError: malformed, corrupt, not a raw container, or the section has the wrong size.
            InvalidInput: ``out`` is too small.
        """
        c = unpack_for(container, self.name)
        if c.params:
            raise CodecError(f"raw container has unexpected params {sorted(c.params)}")
        data = c.section("data")
        if len(c.sections) != 1 or len(data) != c.layout.nbytes:
            raise CodecError(f"raw container holds {len(data)} bytes; its layout says {c.layout.nbytes}")
        np.copyto(output_bytes(out, c.layout), np.frombuffer(data, dtype=np.uint8))
        return c.layout


register_codec(RawCodec.name, RawCodec)
