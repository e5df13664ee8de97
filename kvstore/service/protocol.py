"""The data-plane wire protocol, version 1: a fixed prefix, a msgpack header, raw payload.

Frame layout (little-endian), specified byte by byte in docs/protocol.md::

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
headers are plain maps of ints, floats, strings, bytes, bools and lists of them.

Every error a reply can carry maps to one exception class (:data:`ERROR_CLASSES`),
so the server raises typed errors and the client re-raises the same types.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from kvstore.errors import (
    Busy,
    CapacityError,
    ChunkCorrupt,
    CodecError,
    ChunkTooLarge,
    InvalidInput,
    KVStoreError,
    LeaseError,
    RemoteUnavailable,
    UnknownName,
    UnknownNamespace,
)
from kvstore.keys import Namespace
from kvstore.spec import KVSpec, ModelFingerprint, Shard

MAGIC = b"KVS1"
VERSION = 1
PREFIX = struct.Struct("<4sBBHIIQ")
PREFIX_BYTES = PREFIX.size  # 24
MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_PAYLOAD = 1 << 30
CHECKSUM_BYTES = 16
MAX_KEYS = 1 << 16  # keys per request
MAX_CODEC_NAME = 64  # characters of a codec name in an XPUT


class MsgType(enum.IntEnum):
    """Request types (client -> daemon) and reply types (daemon -> client)."""

    HELLO = 1  # {token?, client?, shm?} -> HELLO_OK {tenant, max_payload_bytes, max_inflight_bytes, shm}
    REGISTER = 2  # {spec} -> OK {namespace, chunk_bytes}
    PUT = 3  # {ns, keys, sizes, checksums | checksum_trailer, cost?} + payload -> OK {stored}
    LOOKUP = 4  # {ns, keys? | tokens in payload, lease?, ttl_s?, wait_s?} -> OK {hit_tokens, keys, tiers, query_chunks, lease}
    GET = 5  # {ns, keys, lease?, capacity?} -> OK {sizes (-1 = miss), checksums} + payload
    DELETE = 6  # {ns, keys} -> OK {deleted}
    PREFETCH = 7  # {ns, keys} -> OK {promoted, present}
    RELEASE = 8  # {lease} -> OK {released}
    SHM_GET = 9  # {ns, keys, lease?} -> OK {offsets, sizes, pin}
    SHM_RELEASE = 10  # {pins} -> OK {released}
    SHM_RESERVE = 11  # {ns, keys, sizes} -> OK {offsets (-1 present, -2 no room), reservation}
    SHM_COMMIT = 12  # {reservation, checksums, cost?} | {reservation, abort: true} -> OK {stored}
    STATS = 13  # {} -> OK {...}
    PING = 14  # {} -> OK {}
    LIST = 15  # {ns, limit?} -> OK {keys, truncated}
    CLEAR = 16  # {ns} -> OK {removed}
    SHM_WRITTEN = 17  # {reservation, index, upto} -> OK {hashed}: the daemon may hash bytes [0, upto) now
    HAVE = 18  # {ns, keys} -> OK {present: [bool]}: which chunks this namespace holds (resuming transfers)
    XPUT = 19  # {ns, keys, sizes, checksums, codecs, raw_checksums?, cost?} + payload -> OK {stored, decode_s}
    ANNOUNCE = 20  # {ns, keys, ttl_s} -> OK {announced} | {ns, keys, withdraw: true} -> OK {withdrawn}: in flight

    OK = 64
    HELLO_OK = 65
    ERROR = 96  # {code, message, closing}
    BUSY = 97  # {message, retry_after_s}: overloaded, nothing was done


REQUEST_TYPES = frozenset(t for t in MsgType if t < MsgType.OK)


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
    CHECKSUM = 11
    SHUTTING_DOWN = 12


class ProtocolError(KVStoreError):
    """A frame that violates the protocol (bad magic, version, sizes or header)."""

    code = ErrorCode.BAD_FRAME


class PayloadTooLarge(ProtocolError, InvalidInput):
    """A frame's payload (or a request's in-flight bytes) exceeds what this connection accepts."""

    code = ErrorCode.TOO_LARGE


class UnknownMessageType(ProtocolError):
    """A message type this side does not speak."""

    code = ErrorCode.UNKNOWN_TYPE


class Unauthorized(KVStoreError, PermissionError):
    """No valid HELLO (missing or unknown bearer token) on a daemon that requires one."""


class Forbidden(KVStoreError, PermissionError):
    """The connection's tenant may not do this (e.g. register another tenant's namespace)."""


class ServerError(KVStoreError):
    """The daemon failed in a way the request did not cause (a bug or an outage below it)."""


class ShuttingDown(RemoteUnavailable):
    """The daemon is draining before it stops; retry against its successor."""


class RequestTimeout(RemoteUnavailable, TimeoutError):
    """No reply within the client's timeout."""


#: reply error code -> the exception a client raises (see also :func:`error_code`)
ERROR_CLASSES: dict[ErrorCode, type[KVStoreError]] = {
    ErrorCode.BAD_FRAME: ProtocolError,
    ErrorCode.BAD_REQUEST: InvalidInput,
    ErrorCode.UNAUTHORIZED: Unauthorized,
    ErrorCode.FORBIDDEN: Forbidden,
    ErrorCode.UNKNOWN_NAMESPACE: UnknownNamespace,
    ErrorCode.TOO_LARGE: PayloadTooLarge,
    ErrorCode.UNKNOWN_TYPE: UnknownMessageType,
    ErrorCode.LEASE: LeaseError,
    ErrorCode.INTERNAL: ServerError,
    ErrorCode.CAPACITY: CapacityError,
    ErrorCode.CHECKSUM: ChunkCorrupt,
    ErrorCode.SHUTTING_DOWN: ShuttingDown,
}

#: most specific first: an exception maps to the code of the first class it is an instance of
_CODE_ORDER: tuple[tuple[type[BaseException], ErrorCode], ...] = (
    (PayloadTooLarge, ErrorCode.TOO_LARGE),
    (ChunkTooLarge, ErrorCode.TOO_LARGE),
    (UnknownMessageType, ErrorCode.UNKNOWN_TYPE),
    (ProtocolError, ErrorCode.BAD_FRAME),
    (Unauthorized, ErrorCode.UNAUTHORIZED),
    (Forbidden, ErrorCode.FORBIDDEN),
    (UnknownNamespace, ErrorCode.UNKNOWN_NAMESPACE),
    (LeaseError, ErrorCode.LEASE),
    (ChunkCorrupt, ErrorCode.CHECKSUM),
    (CodecError, ErrorCode.CHECKSUM),  # a container that fails its own checks arrived corrupt
    (CapacityError, ErrorCode.CAPACITY),
    (ShuttingDown, ErrorCode.SHUTTING_DOWN),
    (InvalidInput, ErrorCode.BAD_REQUEST),
    (UnknownName, ErrorCode.BAD_REQUEST),
)


def error_code(exc: BaseException) -> ErrorCode:
    """The reply code for an exception a request handler raised (INTERNAL for anything unplanned)."""
    for cls, code in _CODE_ORDER:
        if isinstance(exc, cls):
            return code
    return ErrorCode.INTERNAL


def error_from_reply(code: int, message: str) -> KVStoreError:
    """The typed exception for an ERROR reply; unknown codes become :class:`ServerError`."""
    try:
        cls = ERROR_CLASSES[ErrorCode(code)]
    except ValueError:
        return ServerError(f"error code {code}: {message}")
    return cls(message)


class ServerBusy(Busy):
    """A BUSY reply: the daemon did nothing; retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


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
        ProtocolError: bad magic or version, or a header over the limit.
        PayloadTooLarge: a payload over ``max_payload``.
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
        raise PayloadTooLarge(f"payload of {payload_len} bytes exceeds the limit {max_payload}")
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
            raw,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_HEADER_BYTES,
            max_bin_len=MAX_HEADER_BYTES,
            max_array_len=1 << 20,
            max_map_len=1 << 16,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a map")
    if not all(isinstance(k, str) for k in header):
        raise ProtocolError("header keys must be strings")
    return header


def frame(msg_type: int, request_id: int, header: dict[str, Any], payload_len: int = 0) -> bytes:
    """Prefix + header bytes; the caller sends ``payload_len`` payload bytes after them."""
    raw = encode_header(header)
    return pack_prefix(msg_type, len(raw), request_id, payload_len) + raw


# -- typed field access for headers from the network -------------------------------------
def field_int(
    h: dict[str, Any], name: str, lo: int = 0, hi: int = 1 << 62, default: int | None = None
) -> int:
    v = h.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise InvalidInput(f"field {name!r} must be an integer in [{lo}, {hi}]")
    return v


def field_opt_int(h: dict[str, Any], name: str, lo: int = 0, hi: int = 1 << 62) -> int | None:
    return None if h.get(name) is None else field_int(h, name, lo, hi)


def field_float(h: dict[str, Any], name: str, default: float | None = None) -> float | None:
    v = h.get(name, default)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise InvalidInput(f"field {name!r} must be a finite non-negative number")
    return float(v)


def field_bool(h: dict[str, Any], name: str, default: bool) -> bool:
    v = h.get(name, default)
    if not isinstance(v, bool):
        raise InvalidInput(f"field {name!r} must be a boolean")
    return v


def field_str(h: dict[str, Any], name: str, default: str | None = None, max_len: int = 4096) -> str:
    v = h.get(name, default)
    if not isinstance(v, str) or len(v) > max_len:
        raise InvalidInput(f"field {name!r} must be a string of at most {max_len} characters")
    return v


def field_bytes(h: dict[str, Any], name: str, length: int | None = None) -> bytes:
    v = h.get(name)
    if not isinstance(v, bytes) or (length is not None and len(v) != length):
        want = f"{length} bytes" if length is not None else "bytes"
        raise InvalidInput(f"field {name!r} must be {want}")
    return v


def field_keys(h: dict[str, Any], name: str = "keys", max_items: int = MAX_KEYS) -> list[bytes]:
    v = h.get(name)
    if not isinstance(v, list) or len(v) > max_items:
        raise InvalidInput(f"field {name!r} must be a list of at most {max_items} 32-byte keys")
    for k in v:
        if not isinstance(k, bytes) or len(k) != 32:
            raise InvalidInput(f"field {name!r} must hold 32-byte keys")
    return v


def field_ints(h: dict[str, Any], name: str, count: int | None = None, lo: int = 0) -> list[int]:
    """A list of integers >= ``lo`` (of exactly ``count`` items when given)."""
    v = h.get(name)
    if not isinstance(v, list) or (count is not None and len(v) != count) or len(v) > MAX_KEYS:
        want = f"{count} integers" if count is not None else f"at most {MAX_KEYS} integers"
        raise InvalidInput(f"field {name!r} must list {want}")
    for s in v:
        if not isinstance(s, int) or isinstance(s, bool) or s < lo or s >= 1 << 62:
            raise InvalidInput(f"field {name!r} must hold integers >= {lo}")
    return v


def field_checksums(h: dict[str, Any], count: int, name: str = "checksums") -> list[bytes]:
    v = h.get(name)
    if not isinstance(v, list) or len(v) != count:
        raise InvalidInput(f"field {name!r} must list {count} checksums")
    for c in v:
        if not isinstance(c, bytes) or len(c) != CHECKSUM_BYTES:
            raise InvalidInput(f"field {name!r} must hold {CHECKSUM_BYTES}-byte XXH3-128 digests")
    return v


def field_sizes(h: dict[str, Any], count: int, payload_len: int, extra: int = 0) -> list[int]:
    """``sizes``: ``count`` positive sizes adding up to the payload (less ``extra`` trailing bytes)."""
    v = h.get("sizes")
    if not isinstance(v, list) or len(v) != count:
        raise InvalidInput(f"field 'sizes' must list {count} sizes")
    for s in v:
        if not isinstance(s, int) or isinstance(s, bool) or s < 1 or s >= 1 << 62:
            raise InvalidInput("sizes must be positive integers")
    if sum(v) + extra != payload_len:
        raise InvalidInput(
            f"sizes add up to {sum(v)} (+{extra} trailer) but the payload is {payload_len} bytes"
        )
    return v


# -- namespaces on the wire (REGISTER) ----------------------------------------------------
def namespace_to_wire(ns: Namespace, with_tenant: bool = True) -> dict[str, Any]:
    """The REGISTER ``spec`` map of a namespace (docs/protocol.md lists every field)."""
    s = ns.spec
    wire: dict[str, Any] = {
        "model": s.model.name, "revision": s.model.revision, "num_layers": s.num_layers,
        "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim, "dtype": s.dtype, "layout": s.layout,
        "tp_rank": s.shard.tp_rank, "tp_size": s.shard.tp_size, "pp_rank": s.shard.pp_rank,
        "pp_size": s.shard.pp_size, "scheme": ns.scheme, "chunk_tokens": ns.chunk_tokens,
    }  # fmt: skip
    if with_tenant:
        wire["tenant"] = ns.tenant
    return wire


def namespace_from_wire(wire: object, tenant: str) -> Namespace:
    """The namespace a REGISTER ``spec`` map names, for ``tenant``.

    Raises:
        InvalidInput: a missing or mistyped field, or values KVSpec/Namespace reject.
    """
    if not isinstance(wire, dict):
        raise InvalidInput("field 'spec' must be a map")
    shard = Shard(
        *(
            field_int(wire, f, default=d)
            for f, d in (("tp_rank", 0), ("tp_size", 1), ("pp_rank", 0), ("pp_size", 1))
        )
    )
    spec = KVSpec(
        ModelFingerprint(field_str(wire, "model"), field_str(wire, "revision", "")),
        field_int(wire, "num_layers", 1, 1 << 20),
        field_int(wire, "num_kv_heads", 1, 1 << 20),
        field_int(wire, "head_dim", 1, 1 << 20),
        field_str(wire, "dtype", "bfloat16"),  # type: ignore[arg-type]
        field_str(wire, "layout", "kv_separate"),  # type: ignore[arg-type]
        shard,
    )
    return Namespace(
        tenant,
        spec,
        field_str(wire, "scheme", "sha256-chain-v1"),
        field_int(wire, "chunk_tokens", 1, 1 << 20, default=256),
    )
