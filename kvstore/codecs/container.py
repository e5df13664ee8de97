"""The container: the self-describing bytes every codec writes.

Byte layout (little-endian; specified in docs/codecs.md)::

    0   magic          4 bytes  b"KVC1"
    4   version        u16      1
    6   header_len     u32      length of the msgpack header, <= MAX_HEADER_BYTES
    10  header_xxh3    u64      XXH3-64 of the header bytes
    18  header         msgpack map (codec, params, spec, num_tokens, dtype, shape, sections)
        zero padding to the next multiple of ALIGN (from the container start)
        sections       each at a multiple of ALIGN, in table order, zero padding between

Invariants of a container :func:`unpack` accepts: every byte is checked --
the fixed prefix by value, the header by its checksum and a strict schema,
padding must be zero, each section by its own XXH3-64 -- and the container
ends exactly where its last section ends. So a mutated or truncated
container either raises :class:`CodecError` or (a header rewritten with a
fresh checksum) still passes every check and means what it says. The chunk
the header describes is at most ``MAX_DECODED_BYTES`` long and its shape and
dtype agree with the spec. No pickle; msgpack is read with hard limits.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import msgpack
import numpy as np
import xxhash

from kvstore.buffers import U8, as_u8
from kvstore.codecs.base import MAX_DECODED_BYTES, ChunkLayout, CodecParams
from kvstore.codecs.container_header import (
    ALIGN,
    HEADER_KEYS,
    MAX_NAME_LEN,
    MAX_PARAMS,
    MAX_SECTIONS,
    MAX_STR_LEN,
    ParamValue,
    Section,
    align,
    check_layout,
    check_map,
    check_params,
    check_sections,
    check_str,
    spec_from_dict,
    spec_to_dict,
)
from kvstore.errors import CodecError, InvalidInput
from kvstore.spec import KVSpec

__all__ = [
    "ALIGN", "MAGIC", "MAX_HEADER_BYTES", "VERSION", "Container", "ParamValue", "Section", "input_bytes",
    "output_bytes", "pack", "spec_from_dict", "spec_to_dict", "unpack", "unpack_for",
]

MAGIC: Final = b"KVC1"
VERSION: Final = 1
PREFIX = struct.Struct("<4sHIQ")
MAX_HEADER_BYTES: Final = 64 << 10
SectionData = bytes | bytearray | memoryview | U8


@dataclass(frozen=True, slots=True)
class Container:
    """A parsed container over the caller's buffer (no copy).

    Invariants: ``layout`` is a valid chunk layout of at most
    ``MAX_DECODED_BYTES``; sections lie inside ``buffer``, in order, without
    overlap; when built by :func:`unpack` with ``verify=True`` every section
    matched its checksum.
    """

    version: int
    codec: str
    params: MappingProxyType[str, ParamValue]
    layout: ChunkLayout
    sections: tuple[Section, ...]
    header_nbytes: int
    buffer: memoryview

    @property
    def spec(self) -> KVSpec:
        return self.layout.spec

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @property
    def dtype(self) -> str:
        return self.layout.spec.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    @property
    def nbytes(self) -> int:
        return len(self.buffer)

    def has_section(self, name: str) -> bool:
        return any(s.name == name for s in self.sections)

    def section(self, name: str) -> memoryview:
        """The bytes of section ``name`` (a view into the container).

        Raises:
            CodecError: the container has no such section.
        """
        for s in self.sections:
            if s.name == name:
                return self.buffer[s.offset : s.offset + s.length]
        raise CodecError(f"{self.codec} container has no section {name!r}")

    def section_ok(self, name: str) -> bool:
        """Whether section ``name`` matches its checksum (computed now)."""
        for s in self.sections:
            if s.name == name:
                return _xxh3(self.buffer[s.offset : s.offset + s.length]) == s.xxh3
        raise CodecError(f"{self.codec} container has no section {name!r}")


def _xxh3(data: memoryview | bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


def _read_header(buf: memoryview) -> tuple[int, dict[str, object], int]:
    """(version, header map with exactly the header keys, header end) after the prefix checks."""
    if len(buf) < PREFIX.size:
        raise CodecError(f"container of {len(buf)} bytes is shorter than its {PREFIX.size}-byte prefix")
    magic, version, header_len, header_sum = PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CodecError(f"not a kvstore container (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise CodecError(f"container version {version} is not supported (this reader knows {VERSION})")
    if not 1 <= header_len <= MAX_HEADER_BYTES or PREFIX.size + header_len > len(buf):
        raise CodecError(f"header length {header_len} is out of range or past the end ({len(buf)} bytes)")
    raw = buf[PREFIX.size : PREFIX.size + header_len]
    if _xxh3(raw) != header_sum:
        raise CodecError("container header checksum mismatch")
    unpacker = msgpack.Unpacker(
        max_buffer_size=MAX_HEADER_BYTES, max_str_len=MAX_STR_LEN, max_bin_len=0, max_array_len=MAX_SECTIONS,
        max_map_len=MAX_PARAMS, max_ext_len=0, raw=False, strict_map_key=True, use_list=True,
    )
    try:
        unpacker.feed(raw)
        header = unpacker.unpack()
        consumed = unpacker.tell()
    except Exception as exc:  # noqa: BLE001  # msgpack raises ValueError, OutOfData, StackError, Unicode...
        raise CodecError(f"malformed container header: {type(exc).__name__}: {exc}") from None
    if consumed != header_len:
        raise CodecError(f"container header has {header_len - consumed} trailing bytes")
    return version, check_map(header, "header", HEADER_KEYS), PREFIX.size + header_len


def _check_padding(buf: memoryview, gaps: list[tuple[int, int]]) -> None:
    for lo, hi in gaps:
        if hi > lo and np.frombuffer(buf[lo:hi], dtype=np.uint8).any():
            raise CodecError(f"non-zero padding in container bytes [{lo}, {hi})")


def unpack(buf: bytes | bytearray | memoryview | U8, *, verify: bool = True) -> Container:
    """Parse and validate a container without copying its sections.

    Args:
        buf: the container bytes (untrusted).
        verify: check every section's checksum (``kvstore inspect`` reports
            them one by one instead).

    Returns:
        The :class:`Container`, whose sections are views into ``buf``.

    Raises:
        CodecError: anything wrong: short, bad magic or version, header
            checksum, schema, types, ranges, sizes, offsets, padding or a
            section checksum.
    """
    try:
        view = as_u8(buf).data
    except InvalidInput as exc:
        raise CodecError(f"container is not a byte buffer: {exc}") from None
    version, header, header_end = _read_header(view)
    codec = check_str(header["codec"], "codec", max_len=MAX_NAME_LEN)
    params = check_params(header["params"])
    layout = check_layout(header, spec_from_dict(header["spec"]))
    sections = check_sections(header["sections"], header_end, len(view))
    ends = [header_end] + [s.offset + s.length for s in sections]
    _check_padding(view, [(end, s.offset) for end, s in zip(ends, sections)])
    container = Container(version, codec, MappingProxyType(params), layout, sections, header_end, view)
    if verify:
        for s in sections:
            if not container.section_ok(s.name):
                raise CodecError(f"{codec} container section {s.name!r} checksum mismatch")
    return container


def _place(
    header: dict[str, object], table: list[dict[str, object]], lengths: list[int]
) -> tuple[bytes, list[int]]:
    """The packed header and section offsets: offsets depend on the header's length and vice versa."""
    offsets = [0] * len(lengths)
    for _ in range(8):  # offsets only grow with the header, msgpack ints have 5 sizes: a few rounds converge
        blob: bytes = msgpack.packb(header, use_bin_type=True)
        pos, placed = PREFIX.size + len(blob), []
        for length in lengths:
            placed.append(align(pos))
            pos = placed[-1] + length
        if placed == offsets:
            return blob, offsets
        offsets = placed
        for entry, offset in zip(table, offsets):
            entry["offset"] = offset
    raise InvalidInput("container section offsets did not converge")  # unreachable in practice


def pack(
    codec: str, params: CodecParams, layout: ChunkLayout, sections: list[tuple[str, SectionData]]
) -> bytes:
    """Write a container: prefix, msgpack header, then the aligned sections.

    Args:
        codec: the registered name of the codec that wrote ``sections``.
        params: the codec's parameters (everything decoding needs).
        layout: what the decoded chunk is.
        sections: named byte strings, in the order they are laid out.

    Returns:
        The container bytes; :func:`unpack` accepts them.

    Raises:
        InvalidInput: too many or duplicate sections, or a header :func:`unpack` would refuse.
    """
    views = [(name, as_u8(data).data) for name, data in sections]
    if not 1 <= len(views) <= MAX_SECTIONS or len({n for n, _ in views}) != len(views):
        raise InvalidInput(f"a container needs 1..{MAX_SECTIONS} uniquely named sections")
    if layout.nbytes > MAX_DECODED_BYTES:
        raise InvalidInput(f"chunk of {layout.nbytes} bytes exceeds MAX_DECODED_BYTES")
    table: list[dict[str, object]] = [
        {"name": n, "offset": 0, "length": len(v), "xxh3": _xxh3(v)} for n, v in views
    ]
    header = {
        "codec": codec,
        "params": {k: params[k] for k in sorted(params)},
        "spec": spec_to_dict(layout.spec),
        "num_tokens": layout.num_tokens,
        "dtype": layout.spec.dtype,
        "shape": list(layout.shape),
        "sections": table,
    }
    try:
        blob, offsets = _place(header, table, [len(v) for _, v in views])
    except (TypeError, ValueError, OverflowError) as exc:  # msgpack refuses a value
        raise InvalidInput(f"cannot write this container header: {exc}") from None
    pieces: list[bytes | memoryview] = [PREFIX.pack(MAGIC, VERSION, len(blob), _xxh3(blob)), blob]
    pos = PREFIX.size + len(blob)
    for start, (_, v) in zip(offsets, views):
        pieces += [bytes(start - pos), v]
        pos = start + len(v)
    out = b"".join(pieces)
    try:
        unpack(out, verify=False)
    except CodecError as exc:
        raise InvalidInput(f"cannot write this container: {exc}") from None
    return out


def unpack_for(buf: bytes | bytearray | memoryview | U8, codec: str) -> Container:
    """:func:`unpack` a container and check that codec ``codec`` wrote it.

    Raises:
        CodecError: malformed, corrupt, or written by another codec.
    """
    container = unpack(buf)
    if container.codec != codec:
        raise CodecError(f"container was written by codec {container.codec!r}, not {codec!r}")
    return container


def input_bytes(raw: U8, layout: ChunkLayout) -> U8:
    """``raw`` as flat bytes, checked to hold exactly one chunk of ``layout``.

    Raises:
        InvalidInput: not a contiguous buffer, or the wrong size.
    """
    flat = as_u8(raw)
    if flat.size != layout.nbytes:
        raise InvalidInput(f"chunk of {flat.size} bytes; the layout holds {layout.nbytes}")
    return flat


def output_bytes(out: U8, layout: ChunkLayout) -> U8:
    """The first ``layout.nbytes`` bytes of ``out``, checked writable.

    Raises:
        InvalidInput: not a writable contiguous buffer, or too small.
    """
    flat = as_u8(out, writable=True)
    if flat.size < layout.nbytes:
        raise InvalidInput(f"output of {flat.size} bytes is too small for {layout.nbytes} decoded bytes")
    return flat[: layout.nbytes]
