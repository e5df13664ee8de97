"""RESP framing of the remote tier's data path: SETs sent from caller memory, GETs read into it.

A SET sends header and payload as two pieces of one bulk string (the payload
is not copied on the client) and a GET receives the payload straight into
the caller's buffer (``recv_into``), then checks its XXH3-128. Both travel on
redis-py's pooled connections; a Cluster redirect (MOVED/ASK), or a
connection without a socket to read from, is redone through redis-py by the
``redo`` function the tier passes in.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
from redis import exceptions as rex
from redis.connection import ConnectionPool

from kvstore.buffers import U8
from kvstore.checksum import checksum, copy_with_checksum
from kvstore.errors import ChunkCorrupt
from kvstore.keys import ChunkKey
from kvstore.tiers.base import ChunkMeta, MissReason
from kvstore.tiers.record import HEADER_BYTES, RecordHeader
from kvstore.tiers.remote_link import DOWN

log = logging.getLogger("kvstore.tiers.remote")  # the tier's logger: one name for all of its messages

_READ_BYTES = 64 << 10  # reply-line buffer; payloads bypass it
_SMALL = 64 << 10  # payloads below this are joined into the command bytes


class Conn(Protocol):
    """The part of a redis-py connection the framed data path uses (redis-py leaves it untyped)."""

    def send_packed_command(self, command: Sequence[bytes | memoryview]) -> None: ...

    def pack_commands(self, commands: list[tuple[str, bytes]]) -> list[bytes]: ...

    def read_response(self) -> object: ...

    def disconnect(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Got:
    """A verified record: its header and the caller memory now holding the payload."""

    header: RecordHeader
    data: U8


class Redirect:
    """A Cluster MOVED/ASK reply: redis-py redoes the command and learns the new slot map."""


REDIRECT = Redirect()
Outcome = Got | MissReason
Dest = Callable[[int], U8 | None]


@dataclass(frozen=True, slots=True)
class ReadJob:
    key: ChunkKey
    rkey: bytes
    dest: Dest  # memory for a payload of n bytes, or None if it does not fit


@dataclass(frozen=True, slots=True)
class WriteJob:
    key: ChunkKey
    rkey: bytes
    header: bytes
    payload: U8
    meta: ChunkMeta

    @property
    def size(self) -> int:
        return HEADER_BYTES + self.payload.size


def fits(out: U8) -> Dest:
    """A Dest that places a payload at the start of ``out`` if it fits."""
    return lambda n: out[:n] if n <= out.size else None


def fresh(n: int) -> U8:
    """A Dest that allocates exactly the payload's size."""
    return np.empty(n, dtype=np.uint8)


# -- SET ------------------------------------------------------------------------------------


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def set_command(job: WriteJob, ttl_ms: int | None) -> list[bytes | memoryview]:
    """RESP for SET rkey header+payload [PX ms], the payload as its own piece."""
    opts = [b"PX", b"%d" % ttl_ms] if ttl_ms else []
    head = b"*%d\r\n" % (3 + len(opts)) + _bulk(b"SET") + _bulk(job.rkey) + b"$%d\r\n" % job.size
    return [head + job.header, job.payload.data, b"\r\n" + b"".join(map(_bulk, opts))]


def coalesce(pieces: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """Join runs of small pieces so that only large payloads are sent on their own."""
    out: list[bytes | memoryview] = []
    run: list[bytes | memoryview] = []
    for piece in pieces:
        if len(piece) < _SMALL:
            run.append(piece)
            continue
        if run:
            out.append(b"".join(run))
            run = []
        out.append(piece)
    if run:
        out.append(b"".join(run))
    return out


def set_reply(conn: Conn) -> bool | Redirect:
    """True if the SET was stored, False if Redis refused it, REDIRECT on MOVED/ASK."""
    try:
        conn.read_response()
    except DOWN:
        raise
    except rex.AskError:  # MOVED too
        return REDIRECT
    except rex.ResponseError as exc:  # OOM, READONLY...: this value is refused, the link is fine
        log.warning("redis refused a SET: %s", exc)
        return False
    return True


def write_group(
    pool: ConnectionPool, jobs: list[WriteJob], ttl_ms: int | None, redo: Callable[[WriteJob], bool]
) -> list[bool]:
    """Pipelined SETs of ``jobs`` on one pooled connection; ``redo`` stores a redirected one."""
    pooled = pool.get_connection()
    conn = cast(Conn, pooled)
    try:
        pieces = [p for job in jobs for p in set_command(job, ttl_ms)]
        conn.send_packed_command(coalesce(pieces))
        replies = [set_reply(conn) for _ in jobs]
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(pooled)
    return [redo(j) if r is REDIRECT else r is True for j, r in zip(jobs, replies)]


# -- GET ------------------------------------------------------------------------------------


class Replies:
    """Reads RESP replies from a socket; bulk payloads land straight in caller memory."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray(_READ_BYTES)
        self._lo = self._hi = 0

    def _fill(self) -> None:
        if self._lo == self._hi:
            self._lo = self._hi = 0
        elif self._hi == len(self._buf):
            if self._lo == 0:
                raise rex.ConnectionError("reply line longer than the read buffer")
            self._buf[: self._hi - self._lo] = self._buf[self._lo : self._hi]
            self._lo, self._hi = 0, self._hi - self._lo
        n = self._sock.recv_into(memoryview(self._buf)[self._hi :])
        if n == 0:
            raise rex.ConnectionError("the server closed the connection")
        self._hi += n

    def line(self) -> bytes:
        while (end := self._buf.find(b"\r\n", self._lo, self._hi)) < 0:
            self._fill()
        line = bytes(self._buf[self._lo : end])
        self._lo = end + 2
        return line

    def into(self, dst: memoryview) -> None:
        have = min(self._hi - self._lo, len(dst))
        dst[:have] = self._buf[self._lo : self._lo + have]
        self._lo += have
        while have < len(dst):
            n = self._sock.recv_into(dst[have:])
            if n == 0:
                raise rex.ConnectionError("the server closed the connection")
            have += n

    def skip(self, n: int) -> None:
        while n:
            if self._lo == self._hi:
                self._fill()
            take = min(n, self._hi - self._lo)
            self._lo += take
            n -= take

    def exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self.into(memoryview(buf))
        return bytes(buf)


def recv_record(replies: Replies, job: ReadJob) -> Outcome | Redirect:
    """Read one GET reply, checking header, length and checksum before reporting a hit."""
    line = replies.line()
    if line.startswith((b"-MOVED", b"-ASK")):
        return REDIRECT
    if line.startswith(b"-WRONGTYPE"):
        return MissReason.CORRUPT
    if line in (b"$-1", b"_"):
        return MissReason.ABSENT
    if not line.startswith(b"$") or not line[1:].isdigit():
        raise rex.ConnectionError(f"unexpected reply to GET: {line[:120]!r}")
    size = int(line[1:])
    if size < HEADER_BYTES:
        replies.skip(size + 2)
        return MissReason.CORRUPT
    raw = replies.exact(HEADER_BYTES)
    payload_len = size - HEADER_BYTES
    try:
        header = RecordHeader.unpack(raw, job.key)
    except ChunkCorrupt:
        header = None
    if header is None or header.payload_len != payload_len:
        replies.skip(payload_len + 2)
        return MissReason.CORRUPT
    out = job.dest(payload_len)
    if out is None:
        replies.skip(payload_len + 2)
        return MissReason.TOO_SMALL
    replies.into(out.data)
    if replies.exact(2) != b"\r\n":
        raise rex.ConnectionError("bulk reply not terminated by CRLF")
    return Got(header, out) if checksum(out) == header.checksum else MissReason.CORRUPT


def parse_value(raw: object, job: ReadJob) -> Outcome:
    """Check a whole value fetched by redis-py and copy its payload out while hashing it."""
    if raw is None:
        return MissReason.ABSENT
    if not isinstance(raw, bytes) or len(raw) < HEADER_BYTES:
        return MissReason.CORRUPT
    try:
        header = RecordHeader.unpack(memoryview(raw)[:HEADER_BYTES], job.key)
    except ChunkCorrupt:
        return MissReason.CORRUPT
    if header.payload_len != len(raw) - HEADER_BYTES:
        return MissReason.CORRUPT
    out = job.dest(header.payload_len)
    if out is None:
        return MissReason.TOO_SMALL
    src = np.frombuffer(raw, dtype=np.uint8, offset=HEADER_BYTES)
    return Got(header, out) if copy_with_checksum(src, out) == header.checksum else MissReason.CORRUPT


def socket_of(conn: Conn) -> socket.socket | None:
    """The connected socket of a redis-py connection, or None if it exposes none."""
    sock = getattr(conn, "_sock", None)  # redis-py keeps the connected socket here (a private attribute)
    return sock if isinstance(sock, socket.socket) else None


def read_group(
    pool: ConnectionPool, jobs: list[ReadJob], redo: Callable[[ReadJob], Outcome]
) -> list[Outcome]:
    """Pipelined GETs of ``jobs`` on one pooled connection, each payload read into its job's memory.

    ``redo`` fetches a job through redis-py instead: a redirected one, or
    every job if the connection has no socket to read the replies from.
    """
    pooled = pool.get_connection()
    conn = cast(Conn, pooled)
    try:
        raw = None if socket_of(conn) is None else _recv_records(conn, jobs)
    finally:
        pool.release(pooled)
    if raw is None:
        return [redo(j) for j in jobs]
    return [redo(j) if o is REDIRECT else cast(Outcome, o) for j, o in zip(jobs, raw)]


def _recv_records(conn: Conn, jobs: list[ReadJob]) -> list[Outcome | Redirect]:
    """Send the GETs and read their replies; any failure disconnects ``conn``."""
    try:
        conn.send_packed_command(conn.pack_commands([("GET", job.rkey) for job in jobs]))
        sock = socket_of(conn)  # after sending: a health check may have reconnected
        if sock is None:
            raise rex.ConnectionError("connection has no socket")
        replies = Replies(sock)
        return [recv_record(replies, job) for job in jobs]
    except TimeoutError as exc:  # socket.timeout from recv_into
        conn.disconnect()
        raise rex.TimeoutError(f"GET timed out: {exc}") from exc
    except OSError as exc:
        conn.disconnect()
        raise rex.ConnectionError(f"GET failed: {exc}") from exc
    except BaseException:
        conn.disconnect()
        raise
