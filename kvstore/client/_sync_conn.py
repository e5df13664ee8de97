"""One blocking connection to the daemon, and a small thread-safe pool of them.

Replies are read with ``socket.recv_into`` straight into their destination:
a GET's chunks land in the caller's buffers. A put streams each chunk in
blocks, hashing a block just before sending it, and sends the checksums after
the payload (``checksum_trailer``), so hashing costs no extra pass over memory.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import ssl
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import xxhash

from kvstore.buffers import U8
from kvstore.client._frames import (
    SEND_BLOCK,
    ClientOptions,
    Endpoint,
    ServerInfo,
    greeted,
    hello_header,
    reply_error,
    unavailable,
)
from kvstore.errors import KVStoreError
from kvstore.service.migration.tls import TLSError, client_context
from kvstore.service.protocol import (
    PREFIX_BYTES,
    MsgType,
    Prefix,
    ProtocolError,
    RequestTimeout,
    decode_header,
    frame,
    unpack_prefix,
)

log = logging.getLogger("kvstore.client")
MAX_REPLY_PAYLOAD = 1 << 40


class SyncConn:
    """A connected, greeted socket. Not thread-safe: the pool lends it to one thread at a time.

    Invariant: outside a call, no reply is half-read; ``in_exchange`` is True
    only while a request is being sent or its reply read, so a connection that
    an exception left in the middle is recognisable (and closed by the pool).
    """

    def __init__(self, endpoint: Endpoint, opts: ClientOptions) -> None:
        self.endpoint = endpoint
        self._ids = itertools.count(1)
        self._deferred: set[int] = set()
        self._prefix = bytearray(PREFIX_BYTES)
        self.in_exchange = False
        self.closed = False
        self.sock = _connect(endpoint, opts)
        try:
            header, _ = self.call(MsgType.HELLO, hello_header(opts, endpoint.kind == "unix"))
            self.info: ServerInfo = greeted(header, self.sock)
        except BaseException:
            self.close()
            raise

    def call(self, mt: MsgType, header: dict[str, Any], payload: bytes = b"",
             outs: Sequence[U8] | None = None, extra_s: float = 0.0) -> tuple[dict[str, Any], bytes]:
        """Send one request and read its reply (chunks of an OK GET reply go into ``outs``).

        ``extra_s``: seconds the daemon may take beyond the timeout (a LOOKUP that waits).

        Raises:
            RemoteUnavailable / RequestTimeout: the connection failed (it is then unusable).
            KVStoreError subclasses: the daemon's ERROR / BUSY reply.
        """
        rid = self._begin()
        try:
            self.sock.sendall(frame(mt, rid, header, len(payload)) + payload)
        except OSError as exc:
            raise self._broken(exc) from exc
        if extra_s <= 0:
            return self._reply(rid, outs)
        before = self.sock.gettimeout()
        self.sock.settimeout(None if before is None else before + extra_s)
        try:
            return self._reply(rid, outs)
        finally:
            if not self.closed:
                self.sock.settimeout(before)

    def call_put(self, header: dict[str, Any], chunks: Sequence[U8]) -> dict[str, Any]:
        """Send a PUT whose checksums trail its payload, hashing each block just before it is sent."""
        rid = self._begin()
        n = sum(c.size for c in chunks)
        try:
            self.sock.sendall(frame(MsgType.PUT, rid, {**header, "checksum_trailer": True}, n + 16 * len(chunks)))
            digests = [_send_hashed(self.sock, c) for c in chunks]
            self.sock.sendall(b"".join(digests))
        except OSError as exc:
            raise self._broken(exc) from exc
        return self._reply(rid, None)[0]

    def send_only(self, mt: MsgType, header: dict[str, Any]) -> None:
        """Send a request whose reply is read (and dropped) before the next one's (a deferred release)."""
        rid = self._begin()
        try:
            self.sock.sendall(frame(mt, rid, header))
        except OSError as exc:
            raise self._broken(exc) from exc
        self._deferred.add(rid)
        self.in_exchange = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.close()

    # -- internals ---------------------------------------------------------------------
    def _begin(self) -> int:
        if self.closed:
            raise unavailable(self.endpoint, ConnectionError("connection closed"))
        self.in_exchange = True
        return next(self._ids) & 0xFFFFFFFF

    def _reply(self, rid: int, outs: Sequence[U8] | None) -> tuple[dict[str, Any], bytes]:
        try:
            while True:
                prefix, header = self._read_head()
                if prefix.request_id in self._deferred:
                    self._deferred.discard(prefix.request_id)
                    self._skip(prefix, header)
                    continue
                if prefix.request_id != rid:
                    raise ProtocolError(f"reply to request {prefix.request_id} while waiting for {rid}")
                return self._finish(prefix, header, outs)
        except ProtocolError:
            self.close()
            raise
        except KVStoreError:
            raise  # the daemon's typed answer (some are also OSErrors: PermissionError, ConnectionError)
        except OSError as exc:
            raise self._broken(exc) from exc

    def _finish(self, prefix: Prefix, header: dict[str, Any], outs: Sequence[U8] | None) -> tuple[
            dict[str, Any], bytes]:
        error = reply_error(prefix, header)
        if error is not None or outs is None:
            payload = self._recv_bytes(prefix.payload_len)
            if header.get("closing"):
                self.close()
            self.in_exchange = False
            if error is not None:
                raise error
            return header, payload
        sizes = header.get("sizes")
        if not isinstance(sizes, list) or len(sizes) != len(outs) or sum(max(s, 0) for s in sizes) != prefix.payload_len:
            raise ProtocolError("GET reply sizes do not match the request or the payload")
        for size, out in zip(sizes, outs):
            if size > 0:
                self._recv_into(out[:size].data)
        self.in_exchange = False
        return header, b""

    def _skip(self, prefix: Prefix, header: dict[str, Any]) -> None:
        self._recv_bytes(prefix.payload_len)
        error = reply_error(prefix, header)
        if error is not None:
            log.warning("deferred request failed: %s", error)

    def _read_head(self) -> tuple[Prefix, dict[str, Any]]:
        self._recv_into(memoryview(self._prefix))
        prefix = unpack_prefix(bytes(self._prefix), MAX_REPLY_PAYLOAD)
        return prefix, decode_header(self._recv_bytes(prefix.header_len))

    def _recv_bytes(self, n: int) -> bytes:
        if n == 0:
            return b""
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        got, n = 0, view.nbytes
        recv_into = self.sock.recv_into
        while got < n:
            k = recv_into(view[got:])
            if k == 0:
                raise ConnectionResetError("the daemon closed the connection")
            got += k

    def _broken(self, exc: OSError) -> KVStoreError:
        self.close()
        if isinstance(exc, TimeoutError):
            return RequestTimeout(f"no reply from {self.endpoint} within the timeout")
        return unavailable(self.endpoint, exc)


def _send_hashed(sock: socket.socket, chunk: U8) -> bytes:
    h = xxhash.xxh3_128()
    view = chunk.data
    for off in range(0, chunk.size, SEND_BLOCK):
        block = view[off : off + SEND_BLOCK]
        h.update(block)
        sock.sendall(block)
    return h.digest()


def _connect(endpoint: Endpoint, opts: ClientOptions) -> socket.socket:
    timeout_s = opts.timeout_s
    try:
        if endpoint.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout_s)
            try:
                sock.connect(endpoint.path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if opts.tls_for(endpoint):
                try:
                    sock = client_context(opts.tls_ca).wrap_socket(sock, server_hostname=endpoint.host)
                except ssl.SSLError as exc:
                    sock.close()
                    raise TLSError(f"TLS handshake with {endpoint} failed: {exc}") from exc
    except TLSError:
        raise
    except OSError as exc:
        raise unavailable(endpoint, exc) from exc
    return sock


class SyncPool:
    """At most ``size`` connections, lent to one thread at a time; broken ones are dropped."""

    def __init__(self, endpoint: Endpoint, opts: ClientOptions) -> None:
        self.endpoint = endpoint
        self.opts = opts
        self._idle: list[SyncConn] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(opts.pool_size)
        self._closed = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[SyncConn]:
        """Borrow a connection (opened on demand); it goes back unless an exception left it mid-call.

        Raises:
            RequestTimeout: no connection became free within the timeout.
            RemoteUnavailable: the pool is closed or the daemon cannot be reached.
        """
        if not self._slots.acquire(timeout=self.opts.timeout_s):
            raise RequestTimeout(f"no pooled connection to {self.endpoint} became free within the timeout")
        conn: SyncConn | None = None
        try:
            with self._lock:
                if self._closed:
                    raise unavailable(self.endpoint, ConnectionError("the client is closed"))
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = SyncConn(self.endpoint, self.opts)
            yield conn
        finally:
            if conn is not None:
                self._give_back(conn)
            self._slots.release()

    def _give_back(self, conn: SyncConn) -> None:
        with self._lock:
            if not conn.closed and not conn.in_exchange and not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
