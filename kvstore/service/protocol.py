"""The data-plane wire protocol, version 1: a fixed prefix, a msgpack header, raw payload.

Frame layout (little-endian), specified in docs/protocol.md::

    0   4  magic   b"KVS1"
    4   1  version (1)
    5   1  message type (MsgType)
    6   2  flags (0; reserved)
    8   4  header length in bytes (<= MAX_HEADER_BYTES)
    12  4  request id (echoed by the reply; lets a client pipeline requests)
    16  8  payload length in bytes (<= the connection's limit)
    24  .. msgpack header (a map with string keys), then the payload

The payload is the concatenation of raw buffers whose sizes the header lists
(``sizes``); chunk bytes never pass through msgpack. No pickle, no eval:
headers are plain maps of ints, strings, bytes, bools and lists of them.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from kvstore.errors import InvalidInput, KVStoreError

MAGIC = b"KVS1"
VERSION = 1
PREFIX = struct.Struct("<4sBBHIIQ")
PREFIX_BYTES = PREFIX.size  # 24
MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_PAYLOAD = 1 << 30


class MsgType(enum.IntEnum):
    """Request types (client -> daemon) and reply types (daemon -> client)."""

    HELLO = 1  # {token?, client} -> HELLO_OK {tenant, limits, shm}
    REGISTER = 2  # {spec} -> OK {namespace}
    PUT = 3  # {ns, keys, sizes, cost} + payload -> OK {stored}
    LOOKUP = 4  # {ns, keys? | tokens in payload, lease, ttl_s} -> OK {hit_tokens, keys, tiers, lease}
    GET = 5  # {ns, keys, lease?} -> OK {sizes (-1 = miss)} + payload
    DELETE = 6  # {ns, keys} -> OK {deleted}
    PREFETCH = 7  # {ns, keys} -> OK {promoted}
    RELEASE = 8  # {lease} -> OK {released}
    SHM_GET = 9  # {ns, keys, lease?} -> OK {offsets, sizes, pin}
    SHM_RELEASE = 10  # {pin} -> OK {}
    SHM_RESERVE = 11  # {ns, keys, sizes} -> OK {offsets, reservation}
    SHM_COMMIT = 12  # {reservation, checksums, cost} -> OK {stored}
    STATS = 13  # {} -> OK {...}
    PING = 14  # {} -> OK {}

    OK = 64
    HELLO_OK = 65
    ERROR = 96  # {code, message}
    BUSY = 97  # {message, retry_after_s}: overloaded, nothing was done


class ErrorCode(enum.IntEnum):
    """Why a request failed; the client maps each to a typed exception."""

    BAD_FRAME = 1
    BAD_REQUEST = 2
    UNAUTHORIZED = 3
    FORBIDDEN = 4
    UNKNOWN_NAMESPACE = 5
    TOO_LARGE = 6
    UNKNOWN_TYPE = 7
    LEASE = 8
    INTERNAL = 9
    CAPACITY = 10


class ProtocolError(KVStoreError):
    """A frame that violates the protocol (bad magic, version, sizes or header)."""

    code = ErrorCode.BAD_FRAME


@dataclass(frozen=True, slots=True)
class Prefix:
    """The decoded 24-byte frame prefix."""

    type: int
    header_len: int
    request_id: int
    payload_len: int


def pack_prefix(msg_type: int, header_len: int, request_id: int, payload_len: int) -> bytes:
    return PREFIX.pack(MAGIC, VERSION, msg_type, 0, header_len, request_id & 0xFFFFFFFF, payload_len)


def unpack_prefix(raw: bytes | memoryview, max_payload: int) -> Prefix:
    """Decode and bound-check a frame prefix.

    Raises:
        ProtocolError: bad magic or version, or a header/payload over the limits.
    """
    if len(raw) != PREFIX_BYTES:
        raise ProtocolError(f"frame prefix is {PREFIX_BYTES} bytes, got {len(raw)}")
    magic, version, msg_type, _flags, header_len, request_id, payload_len = PREFIX.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}: not a kvstore data-plane frame")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this side speaks {VERSION})")
    if header_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {header_len} bytes exceeds {MAX_HEADER_BYTES}")
    if payload_len > max_payload:
        raise ProtocolError(f"payload of {payload_len} bytes exceeds the limit {max_payload}")
    return Prefix(msg_type, header_len, request_id, payload_len)


def encode_header(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)  # type: ignore[no-any-return]


def decode_header(raw: bytes | memoryview) -> dict[str, Any]:
    """A msgpack map with string keys, decoded with strict limits.

    Raises:
        ProtocolError: not msgpack, not a map, or non-string keys.
    """
    try:
        header = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, max_buffer_size=MAX_HEADER_BYTES,
            max_str_len=MAX_HEADER_BYTES, max_bin_len=MAX_HEADER_BYTES, max_array_len=1 << 20,
            max_map_len=1 << 16, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a map")
    return header


def frame(msg_type: int, request_id: int, header: dict[str, Any], payload_len: int = 0) -> bytes:
    """Prefix + header bytes; the caller sends ``payload_len`` payload bytes after them."""
    raw = encode_header(header)
    return pack_prefix(msg_type, len(raw), request_id, payload_len) + raw


# -- typed field access for headers from the network -------------------------------------
def field_int(h: dict[str, Any], name: str, lo: int = 0, hi: int = 1 << 62, default: int | None = None) -> int:
    v = h.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise InvalidInput(f"field {name!r} must be an integer in [{lo}, {hi}]")
    return v


def field_float(h: dict[str, Any], name: str, default: float | None = None) -> float | None:
    v = h.get(name, default)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or v < 0:
        raise InvalidInput(f"field {name!r} must be a non-negative number")
    return float(v)


def field_bytes(h: dict[str, Any], name: str, length: int | None = None) -> bytes:
    v = h.get(name)
    if not isinstance(v, bytes) or (length is not None and len(v) != length):
        want = f"{length} bytes" if length is not None else "bytes"
        raise InvalidInput(f"field {name!r} must be {want}")
    return v


def field_keys(h: dict[str, Any], name: str = "keys", max_items: int = 1 << 16) -> list[bytes]:
    v = h.get(name)
    if not isinstance(v, list) or len(v) > max_items:
        raise InvalidInput(f"field {name!r} must be a list of at most {max_items} 32-byte keys")
    for k in v:
        if not isinstance(k, bytes) or len(k) != 32:
            raise InvalidInput(f"field {name!r} must hold 32-byte keys")
    return v


def field_sizes(h: dict[str, Any], count: int, payload_len: int) -> list[int]:
    v = h.get("sizes")
    if not isinstance(v, list) or len(v) != count:
        raise InvalidInput(f"field 'sizes' must list {count} sizes")
    for s in v:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise InvalidInput("sizes must be non-negative integers")
    if sum(v) != payload_len:
        raise InvalidInput(f"sizes add up to {sum(v)} but the payload is {payload_len} bytes")
    return v
