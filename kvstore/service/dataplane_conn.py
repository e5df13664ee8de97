"""One data-plane connection: frames in (BufferedProtocol), replies out (Sender), errors answered.

Each frame is answered with exactly one reply carrying its request id, so a
client may pipeline. A frame that breaks the framing itself (bad magic or
version, a header or payload over the limits, a stall or EOF inside a frame)
is answered with a BAD_FRAME / TOO_LARGE error marked ``closing`` and the
connection is closed, since the stream cannot be resynchronised; every other
bad request (bad header, unknown type, wrong fields, missing auth) gets an
ERROR and its payload is skipped, and the connection goes on. Whatever the
connection held (pins, reservations) is given back when it closes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Awaitable
from typing import Any

from kvstore.errors import InvalidInput, KVStoreError
from kvstore.service.dataplane_core import Reply, Result, ServerCore
from kvstore.service.dataplane_handlers import HANDLERS, Ctx
from kvstore.service.dataplane_put import (
    PendingPut,
    begin_put,
    finish_put,
    have,
    parse_xput,
    shm_commit,
    shm_reserve,
    shm_written,
    xput,
)
from kvstore.service.dataplane_reader import BytesSink, FrameReader, Sink
from kvstore.service.dataplane_sender import Sender
from kvstore.service.migration.tls import TransportSender, is_tls
from kvstore.service.dataplane_session import Budget
from kvstore.service.protocol import (
    REQUEST_TYPES,
    ErrorCode,
    MsgType,
    PayloadTooLarge,
    Prefix,
    ProtocolError,
    ServerBusy,
    ShuttingDown,
    Unauthorized,
    UnknownMessageType,
    decode_header,
    encode_header,
    error_code,
    pack_prefix,
)

log = logging.getLogger("kvstore.dataplane")

ALL_HANDLERS = {
    **HANDLERS,
    MsgType.SHM_RESERVE: shm_reserve,
    MsgType.SHM_COMMIT: shm_commit,
    MsgType.SHM_WRITTEN: shm_written,
    MsgType.HAVE: have,
    MsgType.XPUT: xput,
}
MAX_QUEUED_REPLIES = 1024  # stop reading requests while this many replies wait to be sent
MAX_LOOKUP_PAYLOAD = 64 << 20  # token ids of one lookup (16M tokens)


class Connection(asyncio.BufferedProtocol):
    """The protocol object of one client connection (TCP or Unix socket)."""

    def __init__(self, core: ServerCore, unix: bool) -> None:
        self.core = core
        self.unix = unix
        self.pending = 0  # requests read and not yet answered
        self.last_progress = time.monotonic()
        self.closed = False
        self._broken = False  # a frame could not be resynchronised: nothing more is read
        self._transport: asyncio.Transport | None = None
        self._sender: Sender | TransportSender | None = None
        self._ctx: Ctx | None = None
        self._put: PendingPut | None = None
        self._payload_for: tuple[MsgType, int, dict[str, Any], float] | None = None
        self._paused = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._reader = FrameReader(self, core.config.max_payload_bytes, self._count_in)

    # -- asyncio.BufferedProtocol ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # stream servers make stream transports
        self._transport = transport
        sock = transport.get_extra_info("socket")
        peer_uid = _peer_uid(sock) if self.unix else None
        loop = asyncio.get_running_loop()
        self._sender = (
            TransportSender(transport, self._count_out)
            if is_tls(transport)
            else Sender(loop, sock.fileno(), self._send_failed, self._count_out)
        )
        self._ctx = Ctx(
            self.core,
            self.core.new_session(),
            Budget(self.core.config.max_inflight_bytes),
            self.unix,
            peer_uid,
        )
        self.core.stats.opened()
        self.core.connections.add(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed or self._broken:
            return
        self.last_progress = time.monotonic()
        try:
            self._reader.buffer_updated(nbytes)
        except ProtocolError as exc:
            self.fatal(exc)

    def eof_received(self) -> bool:
        if self._broken:
            pass  # the closing error is on its way
        elif self._reader.mid_frame:
            self.fatal(
                ProtocolError(f"truncated frame: the connection ended with {self._reader.describe_partial()}")
            )
        else:
            self._spawn(self._close_when_quiet())
        return True  # keep the write side open for the replies still owed

    def connection_lost(self, exc: Exception | None) -> None:
        self._teardown()

    # -- frames (FrameReader's handler) ------------------------------------------------
    def on_frame(self, prefix: Prefix, header_raw: memoryview) -> Sink | None:
        t0 = time.perf_counter()
        name = _type_name(prefix.type)
        try:
            mt = self._request_type(prefix.type)
            header = decode_header(header_raw)
            self._admit(mt)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an answer
            self._answer_error(prefix.request_id, name, exc, t0)
            return None
        self.pending += 1
        try:
            return self._route(mt, prefix, header, t0)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an answer
            self.pending -= 1
            self._answer_error(prefix.request_id, name, exc, t0)
            return None

    def _route(self, mt: MsgType, prefix: Prefix, header: dict[str, Any], t0: float) -> Sink | None:
        assert self._ctx is not None
        if mt is MsgType.PUT:
            self._put = begin_put(self._ctx, header, prefix.payload_len)
            self._payload_for = (mt, prefix.request_id, header, t0)
            return self._put.sink
        if prefix.payload_len:
            if mt is MsgType.XPUT:
                parse_xput(self._ctx, header, prefix.payload_len)  # refuse a bad header before its payload
            elif mt is not MsgType.LOOKUP:
                raise InvalidInput(f"{mt.name} takes no payload")
            elif prefix.payload_len > MAX_LOOKUP_PAYLOAD:
                raise PayloadTooLarge(f"a LOOKUP payload is at most {MAX_LOOKUP_PAYLOAD} bytes")
            self._ctx.budget.take(prefix.payload_len)
            self._payload_for = (mt, prefix.request_id, header, t0)
            return BytesSink(prefix.payload_len)
        self._run(mt, prefix.request_id, header, None, t0)
        return None

    def on_payload(self, sink: Sink) -> None:
        target, self._payload_for = self._payload_for, None
        if target is None:
            return  # a payload skipped after an error reply
        mt, rid, header, t0 = target
        assert self._ctx is not None
        if mt is MsgType.PUT:
            put, self._put, ctx = self._put, None, self._ctx
            assert put is not None
            self._settle(mt, rid, lambda: finish_put(ctx, put), t0)
            return
        assert isinstance(sink, BytesSink)
        self._ctx.budget.give(len(sink.data))
        self._run(mt, rid, header, bytes(sink.data), t0)

    def _request_type(self, raw: int) -> MsgType:
        try:
            mt = MsgType(raw)
        except ValueError:
            mt = None
        if mt is None or mt not in REQUEST_TYPES:
            raise UnknownMessageType(f"unknown message type {raw}; this daemon speaks protocol v1")
        return mt

    def _admit(self, mt: MsgType) -> None:
        assert self._ctx is not None
        if self.core.draining:
            raise ShuttingDown("the daemon is shutting down; retry against its successor")
        if mt is not MsgType.HELLO and self.core.config.tokens and not self._ctx.session.authenticated:
            raise Unauthorized("send HELLO with a valid bearer token first")

    # -- running handlers, answering ---------------------------------------------------
    def _run(self, mt: MsgType, rid: int, header: dict[str, Any], payload: bytes | None, t0: float) -> None:
        ctx = self._ctx
        assert ctx is not None
        self._settle(mt, rid, lambda: ALL_HANDLERS[mt](ctx, header, payload), t0)

    def _settle(self, mt: MsgType, rid: int, call: Any, t0: float) -> None:
        """Run a handler; answer now, or when its awaitable completes."""
        try:
            result: Result = call()
        except Exception as exc:  # noqa: BLE001 - every failure becomes an answer
            self.pending -= 1
            self._answer_error(rid, mt.name, exc, t0)
            return
        if isinstance(result, Reply):
            self.pending -= 1
            self._answer(rid, mt.name, result, t0)
        else:
            self._spawn(self._await_reply(mt, rid, result, t0))

    async def _await_reply(self, mt: MsgType, rid: int, pending: Awaitable[Reply], t0: float) -> None:
        try:
            reply = await pending
        except Exception as exc:  # noqa: BLE001 - every failure becomes an answer
            self.pending -= 1
            self._answer_error(rid, mt.name, exc, t0)
            return
        self.pending -= 1
        self._answer(rid, mt.name, reply, t0)

    def _answer(self, rid: int, name: str, reply: Reply, t0: float) -> None:
        self.core.stats.answered(name, time.perf_counter() - t0, True)
        budget = self._ctx.budget if self._ctx is not None else None
        user_cb = reply.on_sent

        def sent(ok: bool) -> None:
            if budget is not None and reply.inflight:
                budget.give(reply.inflight)
            if user_cb is not None:
                user_cb(ok)
            self._maybe_resume()

        self._send(reply.type, rid, reply.header, reply.payload, sent)

    def _answer_error(
        self, rid: int, name: str, exc: BaseException, t0: float, closing: bool = False
    ) -> None:
        seconds = time.perf_counter() - t0
        if isinstance(exc, ServerBusy):
            self.core.stats.answered(name, seconds, False, busy=True)
            self._send(MsgType.BUSY, rid, {"message": str(exc), "retry_after_s": exc.retry_after_s})
            return
        code = error_code(exc)
        if code is ErrorCode.INTERNAL and not isinstance(exc, KVStoreError):
            log.exception("data-plane request %s failed", name, exc_info=exc)
            message = f"internal error ({type(exc).__name__}); see the daemon's log"
        else:
            message = str(exc) or type(exc).__name__
        self.core.stats.answered(name, seconds, False, error=code.name)
        self._send(
            MsgType.ERROR,
            rid,
            {"code": int(code), "message": message, "closing": closing},
            None,
            (lambda ok: self.close()) if closing else None,
        )

    def _send(
        self,
        mt: MsgType,
        rid: int,
        header: dict[str, Any],
        payload: list[memoryview] | None = None,
        on_sent: Any = None,
    ) -> None:
        raw = encode_header(header)
        n = sum(v.nbytes for v in payload) if payload else 0
        head = pack_prefix(mt, len(raw), rid, n) + raw
        assert self._sender is not None
        self._sender.send([head, *(payload or ())], on_sent)
        if (
            self._sender.queued_items > MAX_QUEUED_REPLIES
            and not self._paused
            and self._transport is not None
        ):
            self._paused = True
            self._transport.pause_reading()

    def _maybe_resume(self) -> None:
        if self._paused and self._sender is not None and self._sender.queued_items < MAX_QUEUED_REPLIES // 2:
            self._paused = False
            if self._transport is not None and not self.closed:
                self._transport.resume_reading()

    # -- ending ------------------------------------------------------------------------
    def fatal(self, exc: BaseException) -> None:
        """Answer a frame that cannot be resynchronised, then close (nothing more is read)."""
        if self.closed or self._broken:
            return
        self._broken = True
        if self._transport is not None:
            self._transport.pause_reading()
        self._answer_error(0, "INVALID", exc, time.perf_counter(), closing=True)

    @property
    def quiet(self) -> bool:
        return self.pending == 0 and (self._sender is None or self._sender.idle)

    async def _close_when_quiet(self) -> None:
        while not self.quiet and not self.closed:
            await asyncio.sleep(0.005)
        self.close()

    def close(self) -> None:
        """Close now: queued replies are dropped, held pins and reservations given back."""
        if self._transport is not None and not self.closed:
            self._transport.close()
        self._teardown()

    def _teardown(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._sender is not None:
            self._sender.close()
        if self._ctx is not None:
            self._ctx.session.release_all()
        for task in self._tasks:
            task.cancel()
        self.core.stats.closed()
        self.core.connections.discard(self)

    def check_timeouts(self, now: float) -> None:
        """Close a connection stalled mid-frame; abort its expired reservations."""
        if self._ctx is not None:
            self._ctx.session.expire(now)
        if self._reader.mid_frame and now - self.last_progress > self.core.config.frame_timeout_s:
            self.fatal(
                ProtocolError(
                    f"truncated frame: no bytes for {self.core.config.frame_timeout_s:g} s "
                    f"with {self._reader.describe_partial()}"
                )
            )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send_failed(self, exc: OSError) -> None:
        log.debug("data-plane send failed: %s", exc)
        self.close()

    def _count_in(self, n: int) -> None:
        self.core.stats.bytes_in += n

    def _count_out(self, n: int) -> None:
        self.core.stats.bytes_out += n


def _type_name(raw: int) -> str:
    try:
        return MsgType(raw).name
    except ValueError:
        return "INVALID"


def _peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED), or None."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    return int(struct.unpack("3i", raw)[1])
