"""The self-checking record header that disk and remote tiers store before a chunk.

Layout (little-endian), 104 bytes, specified in docs/tiers.md::

    0   4  magic  b"KVR1"
    4   1  version (1)
    5   1  flags (0; reserved)
    6   2  reserved (0)
    8   8  payload length in bytes
    16 16  XXH3-128 of the payload
    32 32  chunk key
    64 32  namespace id
    96  8  XXH3-64 of bytes 0..96 (the header itself)

A record whose header check fails, whose key differs from the key it was
read under, or whose payload is shorter or fails its checksum is corrupt:
readers count a miss and never return its bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from kvstore.errors import ChunkCorrupt
from kvstore.keys import ChunkKey, NamespaceId

MAGIC = b"KVR1"
VERSION = 1
_BODY = struct.Struct("<4sBBHQ16s32s32s")
HEADER_BYTES = _BODY.size + 8


@dataclass(frozen=True, slots=True)
class RecordHeader:
    """A decoded record header; ``checksum`` covers the payload only."""

    key: ChunkKey
    namespace: NamespaceId
    payload_len: int
    checksum: bytes

    def pack(self) -> bytes:
        body = _BODY.pack(MAGIC, VERSION, 0, 0, self.payload_len, self.checksum, self.key, self.namespace)
        return body + xxhash.xxh3_64_digest(body)

    @classmethod
    def unpack(cls, raw: bytes | memoryview, expected_key: ChunkKey | None = None) -> "RecordHeader":
        """Decode and check a header.

        Raises:
            ChunkCorrupt: short, bad magic/version, header checksum mismatch,
                or a key other than ``expected_key``.
        """
        if len(raw) < HEADER_BYTES:
            raise ChunkCorrupt(f"record header truncated: {len(raw)} < {HEADER_BYTES} bytes")
        body = bytes(raw[: _BODY.size])
        if xxhash.xxh3_64_digest(body) != bytes(raw[_BODY.size : HEADER_BYTES]):
            raise ChunkCorrupt("record header checksum mismatch")
        magic, version, _flags, _res, length, checksum, key, ns = _BODY.unpack(body)
        if magic != MAGIC or version != VERSION:
            raise ChunkCorrupt(f"not a kvstore record (magic {magic!r}, version {version})")
        if expected_key is not None and key != expected_key:
            raise ChunkCorrupt("record names another key")
        return cls(ChunkKey(key), NamespaceId(ns), length, checksum)
