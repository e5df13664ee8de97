"""What the sync and async clients share: URLs, options, result types, request and reply helpers.

Everything here is free of I/O: the clients build a request with these
helpers, move its bytes over their own sockets, and turn the reply into a
result or a typed exception with them.
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlparse

import numpy as np

from kvstore.buffers import U8, BufferLike, as_u8
from kvstore.checksum import checksum
from kvstore.client._shm import ShmArena
from kvstore.errors import Busy, ChunkCorrupt, InvalidInput, KVStoreError, RemoteUnavailable
from kvstore.keys import ChunkKey, Namespace, TokenInput, as_token_array
from kvstore.service.protocol import (
    MsgType,
    Prefix,
    ProtocolError,
    ServerBusy,
    error_from_reply,
    namespace_to_wire,
)
from kvstore.spec import KVSpec

DEFAULT_PORT = 7481
SEND_BLOCK = 512 << 10  # puts hash and send in blocks of this size (hot in cache for the kernel's copy)
NO_CHECKSUM = bytes(16)
SHM_STEP = 4 << 20  # shared-memory puts tell the daemon every this many bytes written, so it hashes meanwhile


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the daemon listens: ``kvstore://host:port`` (TCP), ``kvstores://`` (TCP with TLS) or ``unix:///path``."""

    kind: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""
    tls: bool = False

    def __str__(self) -> str:
        scheme = "kvstores" if self.tls else "kvstore"
        return f"unix://{self.path}" if self.kind == "unix" else f"{scheme}://{self.host}:{self.port}"


def parse_url(url: str) -> Endpoint:
    """The endpoint a URL names.

    Raises:
        InvalidInput: another scheme, no host, or no path.
    """
    u = urlparse(url)
    if u.scheme == "unix":
        path = unquote(u.netloc + u.path)
        if not path:
            raise InvalidInput(f"unix URL needs a socket path: {url!r} (unix:///run/kvstore.sock)")
        return Endpoint("unix", path=path)
    if u.scheme in ("kvstore", "tcp", "kvstores"):
        if not u.hostname:
            raise InvalidInput(f"kvstore URL needs a host: {url!r} (kvstore://127.0.0.1:7481)")
        try:
            port = u.port or DEFAULT_PORT
        except ValueError:
            raise InvalidInput(f"bad port in {url!r}") from None
        return Endpoint("tcp", host=u.hostname, port=port, tls=u.scheme == "kvstores")
    raise InvalidInput(f"unsupported URL {url!r}: use kvstore://host:port, kvstores://host:port or unix:///path")


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """How a client talks to the daemon.

    Attributes:
        token: bearer token sent in HELLO (required by daemons configured with tokens).
        timeout_s: per request, and for connecting.
        retries: extra attempts after a connection failure, a timeout, BUSY or
            SHUTTING_DOWN (every request of this client is safe to repeat; docs/client.md).
        backoff_s: first retry delay; doubled per attempt (with jitter) up to ``max_backoff_s``.
        max_backoff_s: the largest retry delay.
        pool_size: connections kept per client (sync: one per concurrent caller).
        use_shm: use the shared-memory path when the daemon offers it (Unix socket, same uid).
        verify: check each chunk read against the checksum the daemon stored with it, and
            have the daemon check each shared-memory put against the client's checksum
            (without it, a shared-memory put is one plain copy and the daemon hashes the
            chunk when it first needs the checksum).
        tls: speak TLS on TCP (also implied by a ``kvstores://`` URL or ``tls_ca``).
        tls_ca: PEM file of the certificate authority (or self-signed certificate) to trust;
            None: the system's trust store.
    """

    token: str | None = None
    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    pool_size: int = 4
    use_shm: bool = True
    verify: bool = False
    tls: bool = False
    tls_ca: str | None = None

    def tls_for(self, endpoint: Endpoint) -> bool:
        """Whether a connection to ``endpoint`` speaks TLS."""
        return endpoint.kind == "tcp" and (self.tls or endpoint.tls or self.tls_ca is not None)

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise InvalidInput("timeout_s must be > 0; backoff_s and max_backoff_s >= 0")
        if self.retries < 0 or self.pool_size < 1:
            raise InvalidInput("retries must be >= 0 and pool_size >= 1")

    def delay(self, attempt: int, exc: BaseException) -> float:
        """Seconds to wait before retry ``attempt`` (1-based) after ``exc``."""
        base = min(self.max_backoff_s, self.backoff_s * (2 ** (attempt - 1)))
        if isinstance(exc, ServerBusy):
            base = max(base, exc.retry_after_s)
        return float(base * (0.5 + random.random() / 2))


def retriable(exc: BaseException) -> bool:
    """Worth another attempt: the daemon was unreachable, slow, busy or restarting."""
    return isinstance(exc, (RemoteUnavailable, Busy))


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What the daemon said in HELLO_OK."""

    tenant: str | None
    version: int
    max_payload_bytes: int
    max_inflight_bytes: int
    shm_path: str | None
    shm_size: int


@dataclass(frozen=True, slots=True)
class LookupHit:
    """The longest cached prefix of a lookup.

    Attributes:
        hit_tokens: tokens covered by the hit chunks.
        keys: the hit chunks' keys, in order.
        tiers: the fastest tier holding each.
        query_chunks: full chunks in the query.
        lease: the lease pinning the hits (pass it to get / release), or None.
    """

    hit_tokens: int
    keys: tuple[ChunkKey, ...]
    tiers: tuple[str, ...]
    query_chunks: int
    lease: int | None

    @property
    def hit_chunks(self) -> int:
        return len(self.keys)


@dataclass(frozen=True, slots=True)
class RemoteStats:
    """The daemon's data-plane counters (``store`` only on daemons without tenants)."""

    connections: int
    requests: Mapping[str, int]
    errors: Mapping[str, int]
    busy: int
    bytes_in: int
    bytes_out: int
    reservations: int
    shm_pins: int
    leases: int
    store: Mapping[str, int] | None = field(default=None)
    inflight: Mapping[str, int] | None = field(default=None)


# -- requests ------------------------------------------------------------------------------
def hello_header(opts: ClientOptions, unix: bool) -> dict[str, Any]:
    header: dict[str, Any] = {"client": "kvstore-python", "shm": bool(opts.use_shm and unix)}
    if opts.token is not None:
        header["token"] = opts.token
    return header


def register_header(ns: Namespace | KVSpec, tenant: str | None, chunk_tokens: int, scheme: str) -> tuple[
        dict[str, Any], Namespace]:
    """The REGISTER header and the namespace it will create (a bare spec takes the connection's tenant)."""
    if isinstance(ns, KVSpec):
        if tenant is None:
            raise InvalidInput("register(spec) needs a daemon with tokens (the token names the tenant); "
                               "pass a Namespace instead")
        ns = Namespace(tenant, ns, scheme, chunk_tokens)
    return {"spec": namespace_to_wire(ns)}, ns


@dataclass(frozen=True, slots=True)
class XPutResult:
    """An XPUT's answer: per chunk whether the daemon holds it, and its decoding time."""

    stored: list[bool]
    decode_s: float


def xput_header(ns: Namespace, keys: Sequence[bytes], payloads: Sequence[bytes], codecs: Sequence[str],
                raw_checksums: Sequence[bytes | None] | None, cost: float) -> dict[str, Any]:
    """The XPUT header: sizes and checksums of ``payloads``, their codecs and raw checksums."""
    n = len(keys)
    raw = list(raw_checksums) if raw_checksums is not None else [None] * n
    if not n or len(payloads) != n or len(codecs) != n or len(raw) != n:
        raise InvalidInput(f"an XPUT needs as many payloads, codecs and raw checksums as keys (>= 1), got {n} keys")
    return {"ns": ns.id, "keys": as_keys(keys), "sizes": [len(p) for p in payloads],
            "checksums": [checksum(np.frombuffer(p, dtype=np.uint8)) for p in payloads],
            "codecs": list(codecs), "raw_checksums": raw, "cost": float(cost)}


def lookup_request(ns: Namespace, tokens: TokenInput | None, keys: Sequence[bytes] | None, lease: bool,
                   ttl_s: float | None, wait_s: float = 0.0) -> tuple[dict[str, Any], bytes]:
    """LOOKUP header and payload (token ids as u32le, or keys in the header)."""
    header: dict[str, Any] = {"ns": ns.id, "lease": lease}
    if ttl_s is not None:
        header["ttl_s"] = float(ttl_s)
    if not isinstance(wait_s, (int, float)) or isinstance(wait_s, bool) or not 0 <= wait_s < float("inf"):
        raise InvalidInput(f"wait_s must be a finite number >= 0, got {wait_s!r}")
    if wait_s > 0:
        header["wait_s"] = float(wait_s)
    if (tokens is None) == (keys is None):
        raise InvalidInput("lookup takes tokens or keys (one of them)")
    if keys is not None:
        header["keys"] = [bytes(k) for k in keys]
        return header, b""
    assert tokens is not None
    return header, as_token_array(tokens).tobytes()


def chunks_of(datas: Sequence[BufferLike]) -> list[U8]:
    arrays = [as_u8(d) for d in datas]
    for i, a in enumerate(arrays):
        if a.size == 0:
            raise InvalidInput(f"chunk {i} is empty")
    return arrays


def batches(sizes: Sequence[int], limit: int) -> list[range]:
    """Consecutive index ranges whose sizes add up to at most ``limit`` each.

    Raises:
        InvalidInput: one size alone exceeds ``limit``.
    """
    out: list[range] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if size > limit:
            raise InvalidInput(f"chunk {i} of {size} bytes exceeds the daemon's limit of {limit} bytes per request")
        if total + size > limit and i > start:
            out.append(range(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


def shm_fill(arena: ShmArena, offsets: Sequence[int], chunks: Sequence[U8]) -> None:
    """Copy each chunk into its reserved extent of the shared arena (offset < 0: nothing to write)."""
    for offset, src in zip(offsets, chunks):
        if offset >= 0:
            np.copyto(arena.view(offset, src.size), src)


def put_limit(info: ServerInfo, nkeys: int) -> int:
    """Chunk bytes one PUT may carry: the daemon's payload and in-flight limits, less the checksum trailer."""
    return min(info.max_payload_bytes, info.max_inflight_bytes) - 16 * nkeys


def out_views(outs: Sequence[BufferLike]) -> list[U8]:
    return [as_u8(o, writable=True) for o in outs]


# -- replies -------------------------------------------------------------------------------
def reply_error(prefix: Prefix, header: dict[str, Any]) -> KVStoreError | None:
    """The typed exception an ERROR or BUSY reply carries; None for a success reply."""
    if prefix.type == MsgType.ERROR:
        code, message = header.get("code"), header.get("message")
        return error_from_reply(code if isinstance(code, int) else 0, str(message))
    if prefix.type == MsgType.BUSY:
        retry = header.get("retry_after_s")
        return ServerBusy(str(header.get("message")), float(retry) if isinstance(retry, (int, float)) else 0.0)
    if prefix.type not in (MsgType.OK, MsgType.HELLO_OK):
        return ProtocolError(f"unexpected reply type {prefix.type}")
    return None


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED), or None."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    return int(struct.unpack("3i", raw)[1])


def greeted(header: dict[str, Any], sock: socket.socket) -> ServerInfo:
    """The HELLO_OK's facts; the shared-memory offer only from a daemon of this very user."""
    info = server_info(header)
    if info.shm_path is not None and (sock.family != socket.AF_UNIX or peer_uid(sock) != os.getuid()):
        info = dataclasses.replace(info, shm_path=None, shm_size=0)
    return info


def server_info(header: dict[str, Any]) -> ServerInfo:
    shm = header.get("shm")
    shm_path = shm.get("path") if isinstance(shm, dict) else None
    shm_size = shm.get("size") if isinstance(shm, dict) else 0
    return ServerInfo(header.get("tenant"), int(header.get("version", 1)), int(header["max_payload_bytes"]),
                      int(header["max_inflight_bytes"]), shm_path if isinstance(shm_path, str) else None,
                      int(shm_size or 0))


def registered(ns: Namespace, header: dict[str, Any]) -> Namespace:
    if header.get("namespace") != ns.id:
        raise ProtocolError("the daemon derived another namespace id for this spec (version skew?)")
    return ns


def announce_header(ns: Namespace, keys: Sequence[bytes], ttl_s: float | None) -> dict[str, Any]:
    """The ANNOUNCE header (``ttl_s`` None: a withdrawal)."""
    if ttl_s is None:
        return {"ns": ns.id, "keys": as_keys(keys), "withdraw": True}
    if not isinstance(ttl_s, (int, float)) or isinstance(ttl_s, bool):
        raise InvalidInput(f"ttl_s must be a number of seconds, got {ttl_s!r}")  # the daemon checks its range
    return {"ns": ns.id, "keys": as_keys(keys), "ttl_s": float(ttl_s)}


def lookup_hit(header: dict[str, Any]) -> LookupHit:
    return LookupHit(int(header["hit_tokens"]), tuple(ChunkKey(k) for k in header["keys"]),
                     tuple(str(t) for t in header["tiers"]), int(header["query_chunks"]), header.get("lease"))


def remote_stats(header: dict[str, Any]) -> RemoteStats:
    s = header.get("server", {})
    return RemoteStats(int(s.get("connections", 0)), dict(s.get("requests", {})), dict(s.get("errors", {})),
                       int(s.get("busy", 0)), int(s.get("bytes_in", 0)), int(s.get("bytes_out", 0)),
                       int(s.get("reservations", 0)), int(s.get("shm_pins", 0)), int(header.get("leases", 0)),
                       header.get("store"), header.get("inflight"))


def check_capacity(i: int, size: int, out: U8) -> None:
    if size > out.size:
        raise InvalidInput(f"output buffer {i} holds {out.size} bytes; the chunk has {size}")


def verify(i: int, data: U8, expected: bytes) -> None:
    """Raises ChunkCorrupt unless ``data`` hashes to the checksum the daemon stored."""
    if expected and checksum(data) != expected:
        raise ChunkCorrupt(f"chunk {i} does not match its stored checksum")


def sizes_or_none(sizes: Sequence[int]) -> list[int | None]:
    return [None if s < 0 else int(s) for s in sizes]


def unavailable(endpoint: Endpoint, exc: BaseException) -> RemoteUnavailable:
    return RemoteUnavailable(f"kvstore daemon at {endpoint} is unreachable: {exc}")


def as_keys(keys: Sequence[bytes]) -> list[bytes]:
    out = [bytes(k) for k in keys]
    for k in out:
        if len(k) != 32:
            raise InvalidInput(f"chunk keys are 32 bytes, got {len(k)}")
    return out


def empty_u8() -> U8:
    return np.empty(0, dtype=np.uint8)
