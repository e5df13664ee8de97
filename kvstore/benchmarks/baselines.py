"""Plain baselines that every benchmark measures the same way: file write/read, a raw-socket
Redis client, traced memory."""

from __future__ import annotations

import os
import socket
import tracemalloc
from collections.abc import Callable
from urllib.parse import unquote, urlparse

import numpy as np
import numpy.typing as npt

U8 = npt.NDArray[np.uint8]


def write_file(path: str, data: U8, fsync: bool = False, truncate: bool = True) -> None:
    """Write ``data`` to a file with ``write()`` (and ``fsync`` if asked): the plain way to persist.

    With ``truncate=False`` an existing file is overwritten in place, so the
    page cache and the filesystem reuse its pages instead of allocating.
    """
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else 0)
    fd = os.open(path, flags, 0o644)
    try:
        view = data.data
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_file_into(path: str, out: U8) -> int:
    """Read a file into the start of ``out`` with ``readinto``; returns the bytes read."""
    with open(path, "rb", buffering=0) as f:
        view, n = out.data, 0
        while n < len(view) and (got := f.readinto(view[n:])):
            n += got
        return n


def traced_bytes(build: Callable[[], object]) -> int:
    """Bytes allocated (per tracemalloc) and still held when ``build`` returns.

    Only Python-level allocations are seen (objects, numpy buffers); what
    ``build`` allocated and freed again does not count.
    """
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = build()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del held
    return after - before


class RawRedis:
    """The least a Redis client can do: RESP on one blocking socket, values sent and received in place.

    A baseline, not a client: SET and GET of large values only, no pooling,
    no retries. It speaks to ``redis://[:password@]host:port[/db]``.
    """

    def __init__(self, url: str, timeout_s: float = 120.0) -> None:
        u = urlparse(url)
        if u.scheme != "redis" or not u.hostname:
            raise ValueError(f"RawRedis needs a redis://host:port URL, got {url!r}")
        self._sock = socket.create_connection((u.hostname, u.port or 6379), timeout=timeout_s)
        if u.password:
            user = [unquote(u.username).encode()] if u.username else []
            self._expect_ok(b"AUTH", *user, unquote(u.password).encode())
        if u.path.strip("/"):
            self._expect_ok(b"SELECT", u.path.strip("/").encode())

    def set(self, key: bytes, value: memoryview) -> None:
        self._send(b"SET", key, value)
        self._expect_ok()

    def get_into(self, key: bytes, out: memoryview) -> int:
        """GET straight into ``out``; returns the value's length (-1 if absent).

        Raises:
            RuntimeError: an error reply or a value larger than ``out``.
        """
        self._send(b"GET", key)
        line = self._line()
        if line == b"$-1":
            return -1
        n = int(line[1:]) if line[:1] == b"$" else -1
        if n < 0 or n > len(out):
            raise RuntimeError(f"GET {key!r}: reply {line[:80]!r} does not fit {len(out)} bytes")
        got = 0
        while got < n:
            got += self._recv_into(out[got:n])
        self._line()  # the CRLF after the value
        return n

    def close(self) -> None:
        self._sock.close()

    def _send(self, *parts: bytes | memoryview) -> None:
        head = b"*%d\r\n" % len(parts)
        for i, part in enumerate(parts):
            head += b"$%d\r\n" % len(part)
            if len(part) >= 1 << 16:  # a large value goes out from its own memory
                self._sock.sendall(head)
                self._sock.sendall(part)
                head = b"\r\n"
            else:
                head += bytes(part) + b"\r\n"
        self._sock.sendall(head)

    def _expect_ok(self, *command: bytes) -> None:
        if command:
            self._send(*command)
        line = self._line()
        if line != b"+OK":
            raise RuntimeError(f"redis answered {line[:80]!r}")

    def _line(self) -> bytes:
        line = bytearray()
        while not line.endswith(b"\r\n"):  # byte by byte: never reads past the line into a value
            byte = self._sock.recv(1)
            if not byte:
                raise ConnectionError("redis closed the connection")
            line += byte
        return bytes(line[:-2])

    def _recv_into(self, view: memoryview) -> int:
        n = self._sock.recv_into(view)
        if n == 0:
            raise ConnectionError("redis closed the connection")
        return n
