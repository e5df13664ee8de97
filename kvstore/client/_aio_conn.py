"""One pipelined asyncio connection to the daemon, and a small pool of them.

Requests from many tasks share a connection: each carries a request id, a
single reader task matches replies to waiting futures and receives a GET's
chunks (``loop.sock_recv_into``) straight into the buffers its request named.
Writes of one frame are serialised by a lock. A timeout, a cancelled GET or
a broken stream closes the connection and fails everything pending on it,
so no late reply can ever write into a buffer its caller has given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
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
from kvstore.errors import KVStoreError, RemoteUnavailable
from kvstore.service.migration.tls import TLSError, client_context
from kvstore.service.protocol import (
    PREFIX_BYTES,
    MsgType,
    ProtocolError,
    RequestTimeout,
    decode_header,
    frame,
    unpack_prefix,
)

log = logging.getLogger("kvstore.client")
MAX_REPLY_PAYLOAD = 1 << 40
Reply = tuple[dict[str, Any], bytes]
Pending = asyncio.Future[Reply]


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[Reply]
    outs: Sequence[U8] | None


class AsyncConn:
    """A connected, greeted, pipelined socket (see the module docstring)."""

    def __init__(self, endpoint: Endpoint, opts: ClientOptions, sock: socket.socket,
                 stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None) -> None:
        self.endpoint = endpoint
        self.opts = opts
        self.sock = sock
        self._stream = stream  # TLS: bytes go through asyncio streams instead of the raw socket
        self.closed = False
        self.info: ServerInfo | None = None
        self._loop = asyncio.get_running_loop()
        self._ids = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}
        self._wlock = asyncio.Lock()
        self._reader = self._loop.create_task(self._read_loop())

    @classmethod
    async def open(cls, endpoint: Endpoint, opts: ClientOptions) -> AsyncConn:
        """Connect and HELLO. Raises RemoteUnavailable (or the daemon's refusal, e.g. Unauthorized)."""
        return await (await cls._connected(endpoint, opts))._greet()

    @classmethod
    async def open_pipelined(cls, endpoint: Endpoint, opts: ClientOptions,
                             requests: Sequence[tuple[MsgType, dict[str, Any]]]) -> tuple[AsyncConn, list[Pending]]:
        """Connect and send HELLO and ``requests`` in one write, without waiting for a reply.

        The daemon handles a connection's frames in order (docs/protocol.md, pipelining), so the
        requests after HELLO are answered as from a greeted connection: opening costs one round trip
        instead of one per request. Returns the greeted connection and the requests' pending
        replies, in order (:meth:`wait` for each).

        Raises:
            RemoteUnavailable, or the daemon's refusal of HELLO (e.g. Unauthorized).
        """
        conn = await cls._connected(endpoint, opts)
        try:
            pending = await conn.pipeline([(MsgType.HELLO, hello_header(opts, endpoint.kind == "unix")), *requests])
            header, _ = await conn.wait(pending[0])
            conn.info = greeted(header, conn.sock)
        except BaseException:
            conn.close()
            raise
        return conn, pending[1:]

    @classmethod
    async def _connected(cls, endpoint: Endpoint, opts: ClientOptions) -> AsyncConn:
        """A connected socket (TLS handshake done), not greeted yet."""
        if opts.tls_for(endpoint):
            return await cls._connected_tls(endpoint, opts)
        loop = asyncio.get_running_loop()
        family = socket.AF_UNIX if endpoint.kind == "unix" else socket.AF_INET
        address: Any = endpoint.path
        try:
            if endpoint.kind == "tcp":
                infos = await loop.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
                family, address = infos[0][0], infos[0][4]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, address), opts.timeout_s)
            except BaseException:
                sock.close()
                raise
        except (TimeoutError, OSError) as exc:
            raise unavailable(endpoint, exc) from exc
        if endpoint.kind == "tcp":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(endpoint, opts, sock)

    @classmethod
    async def _connected_tls(cls, endpoint: Endpoint, opts: ClientOptions) -> AsyncConn:
        """Connect with TLS (the CA of ``opts.tls_ca``)."""
        ctx = client_context(opts.tls_ca)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(endpoint.host, endpoint.port, ssl=ctx, limit=1 << 20), opts.timeout_s)
        except ssl.SSLError as exc:
            raise TLSError(f"TLS handshake with {endpoint} failed: {exc}") from exc
        except (TimeoutError, OSError) as exc:
            raise unavailable(endpoint, exc) from exc
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(endpoint, opts, sock, (reader, writer))

    async def _greet(self) -> AsyncConn:
        try:
            header, _ = await self.call(MsgType.HELLO, hello_header(self.opts, self.endpoint.kind == "unix"))
            self.info = greeted(header, self.sock)
        except BaseException:
            self.close()
            raise
        return self

    @property
    def load(self) -> int:
        return len(self._waiters)

    async def call(self, mt: MsgType, header: dict[str, Any], payload: bytes = b"",
                   outs: Sequence[U8] | None = None, extra_s: float = 0.0) -> Reply:
        """Send one request and await its reply (chunks of an OK GET reply go into ``outs``).

        ``extra_s``: seconds the daemon may take beyond the timeout (a LOOKUP that waits).
        """
        future, rid = self._register(outs)
        await self._write([frame(mt, rid, header, len(payload)) + payload])
        return await self._await(future, outs is not None, extra_s)

    async def call_put(self, header: dict[str, Any], chunks: Sequence[U8]) -> dict[str, Any]:
        """A PUT with trailing checksums; each block hashed just before it is sent."""
        future, rid = self._register(None)
        n = sum(c.size for c in chunks) + 16 * len(chunks)
        head = frame(MsgType.PUT, rid, {**header, "checksum_trailer": True}, n)
        try:
            async with self._wlock:
                await self._sendall(head)
                digests = [await self._send_hashed(c) for c in chunks]
                await self._sendall(b"".join(digests))
        except BaseException as exc:
            raise self._fail(exc) from exc
        return (await self._await(future, False))[0]

    async def pipeline(self, requests: Sequence[tuple[MsgType, dict[str, Any]]]) -> list[Pending]:
        """Send payload-less requests in one write without waiting; their pending replies, in order.

        Every reply is retrieved even if nobody waits for it; :meth:`wait` for those that matter.
        """
        pending = [self._register(None) for _ in requests]
        frames = b"".join(frame(mt, rid, header) for (mt, header), (_, rid) in zip(requests, pending))
        await self._write([frames])
        return [future for future, _ in pending]

    async def wait(self, pending: Pending) -> Reply:
        """The reply of a request sent by :meth:`pipeline` (the daemon's refusal raised; timeout as for call)."""
        return await self._await(pending, False)

    def send_only(self, mt: MsgType, header: dict[str, Any]) -> None:
        """Fire a request whose reply nobody awaits (a release); failures are only logged."""
        if self.closed:
            return
        future, rid = self._register(None)
        future.add_done_callback(_log_failure)
        task = self._loop.create_task(self._write([frame(mt, rid, header)]))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def send_deferred(self, mt: MsgType, header: dict[str, Any]) -> None:
        """Send a request now whose reply nobody awaits (failures are only logged)."""
        future, rid = self._register(None)
        future.add_done_callback(_log_failure)
        await self._write([frame(mt, rid, header)])

    def close(self) -> None:
        """Close the socket; every pending request fails with RemoteUnavailable."""
        if self.closed:
            return
        self.closed = True
        self._reader.cancel()
        self._fail_all(unavailable(self.endpoint, ConnectionError("connection closed")))
        if self._stream is not None:
            self._stream[1].close()
        else:
            with contextlib.suppress(OSError):
                self.sock.close()

    # -- internals ---------------------------------------------------------------------
    def _register(self, outs: Sequence[U8] | None) -> tuple[asyncio.Future[Reply], int]:
        if self.closed:
            raise unavailable(self.endpoint, ConnectionError("connection closed"))
        rid = next(self._ids) & 0xFFFFFFFF
        future: asyncio.Future[Reply] = self._loop.create_future()
        future.add_done_callback(_retrieve)  # a failure nobody awaits (connection closed) is not "lost"
        self._waiters[rid] = _Waiter(future, outs)
        return future, rid

    async def _write(self, bufs: list[bytes]) -> None:
        try:
            async with self._wlock:
                for buf in bufs:
                    await self._sendall(buf)
        except BaseException as exc:
            raise self._fail(exc) from exc

    async def _send_hashed(self, chunk: U8) -> bytes:
        h = xxhash.xxh3_128()
        view = chunk.data
        for off in range(0, chunk.size, SEND_BLOCK):
            block = view[off : off + SEND_BLOCK]
            h.update(block)
            await self._sendall(block)
        return h.digest()

    async def _await(self, future: asyncio.Future[Reply], has_outs: bool, extra_s: float = 0.0) -> Reply:
        timer = self._loop.call_later(self.opts.timeout_s + extra_s, self._expire, future)
        try:
            return await future
        except asyncio.CancelledError:
            if has_outs:
                self.close()  # a late reply must not write into buffers the caller gave up
            raise
        finally:
            timer.cancel()

    def _expire(self, future: asyncio.Future[Reply]) -> None:
        """A request ran past the timeout: fail it and drop the connection (its stream is in doubt)."""
        if not future.done():
            future.set_exception(RequestTimeout(f"no reply from {self.endpoint} within {self.opts.timeout_s:g} s"))
            self.close()

    def _fail(self, exc: BaseException) -> BaseException:
        """Close on a failed write; the exception to raise instead."""
        self.close()
        if isinstance(exc, OSError):
            return unavailable(self.endpoint, exc)
        return exc

    def _fail_all(self, exc: KVStoreError) -> None:
        waiters, self._waiters = self._waiters, {}
        for w in waiters.values():
            if not w.future.done():
                w.future.set_exception(exc)

    async def _read_loop(self) -> None:
        try:
            while True:
                await self._read_one()
        except asyncio.CancelledError:
            raise
        except ProtocolError as exc:
            self._fail_all(exc)
            self.close()
        except Exception as exc:  # noqa: BLE001
            self._fail_all(unavailable(self.endpoint, exc) if not isinstance(exc, RemoteUnavailable) else exc)
            self.close()

    async def _read_one(self) -> None:
        prefix = unpack_prefix(await self._recv_bytes(PREFIX_BYTES), MAX_REPLY_PAYLOAD)
        header = decode_header(await self._recv_bytes(prefix.header_len))
        waiter = self._waiters.pop(prefix.request_id, None)
        if waiter is None:
            raise ProtocolError(f"reply to unknown request {prefix.request_id}")
        error = reply_error(prefix, header)
        if error is None and waiter.outs is not None:
            await self._scatter(prefix.payload_len, header, waiter.outs)
            payload = b""
        else:
            payload = await self._recv_bytes(prefix.payload_len)
        if not waiter.future.done():
            if error is not None:
                waiter.future.set_exception(error)
            else:
                waiter.future.set_result((header, payload))
        if header.get("closing"):
            raise ConnectionResetError("the daemon closed the connection after an error")

    async def _scatter(self, payload_len: int, header: dict[str, Any], outs: Sequence[U8]) -> None:
        sizes = header.get("sizes")
        if not isinstance(sizes, list) or len(sizes) != len(outs) or sum(max(s, 0) for s in sizes) != payload_len:
            raise ProtocolError("GET reply sizes do not match the request or the payload")
        for size, out in zip(sizes, outs):
            if size > 0:
                await self._recv_into(out[:size].data)

    async def _recv_bytes(self, n: int) -> bytes:
        if n == 0:
            return b""
        buf = bytearray(n)
        await self._recv_into(memoryview(buf))
        return bytes(buf)

    async def _recv_into(self, view: memoryview) -> None:
        if self._stream is not None:
            try:
                view[:] = await self._stream[0].readexactly(view.nbytes)
            except asyncio.IncompleteReadError:
                raise ConnectionResetError("the daemon closed the connection") from None
            return
        got, n = 0, view.nbytes
        while got < n:
            k = await self._loop.sock_recv_into(self.sock, view[got:])
            if k == 0:
                raise ConnectionResetError("the daemon closed the connection")
            got += k

    async def _sendall(self, buf: bytes | memoryview) -> None:
        if self._stream is None:
            await self._loop.sock_sendall(self.sock, buf)
            return
        writer = self._stream[1]
        writer.write(buf)
        await writer.drain()


def _retrieve(future: asyncio.Future[Reply]) -> None:
    if not future.cancelled():
        future.exception()


def _log_failure(future: asyncio.Future[Reply]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("deferred request failed: %s", future.exception())


class AsyncPool:
    """Up to ``size`` pipelined connections; a call takes the least loaded, opening one while under size."""

    def __init__(self, endpoint: Endpoint, opts: ClientOptions) -> None:
        self.endpoint = endpoint
        self.opts = opts
        self._conns: list[AsyncConn] = []
        self._opening: asyncio.Lock | None = None
        self._closed = False

    async def connection(self) -> AsyncConn:
        """A live connection to send on (opened on demand)."""
        if self._closed:
            raise unavailable(self.endpoint, ConnectionError("the client is closed"))
        self._conns = [c for c in self._conns if not c.closed]
        idle = min(self._conns, key=lambda c: c.load, default=None)
        if idle is not None and (idle.load == 0 or len(self._conns) >= self.opts.pool_size):
            return idle
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            live = [c for c in self._conns if not c.closed]
            if live and len(live) >= self.opts.pool_size:
                return min(live, key=lambda c: c.load)
            conn = await AsyncConn.open(self.endpoint, self.opts)
            if self._closed:
                conn.close()
                raise unavailable(self.endpoint, ConnectionError("the client is closed"))
            self._conns.append(conn)
            return conn

    def live(self) -> AsyncConn | None:
        """The least loaded open connection, without opening one (None: none is open)."""
        self._conns = [c for c in self._conns if not c.closed]
        return min(self._conns, key=lambda c: c.load, default=None)

    def adopt(self, conn: AsyncConn) -> None:
        """Take a connection opened elsewhere (e.g. by :meth:`AsyncConn.open_pipelined`) into the pool."""
        if self._closed:
            conn.close()
            raise unavailable(self.endpoint, ConnectionError("the client is closed"))
        if not conn.closed and conn not in self._conns:
            self._conns.append(conn)

    def close(self) -> None:
        self._closed = True
        conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
