"""Outgoing frames, sent with ``sendmsg`` straight from the caller's buffers (no copy).

asyncio's selector transport (Python 3.11) copies whatever the kernel did not
take at once into a ``bytearray``; for a 32 MiB chunk that is a second full
copy. The :class:`Sender` instead writes on a duplicate of the connection's
socket (the transport keeps reading on the original) and keeps a queue of
memoryviews: a reply's payload is sent from the CPU arena itself, and the
reply's ``on_sent`` callback (which unpins the chunks) runs only once the
kernel has taken the last byte, or when the connection is lost.

Invariant: every queued item's ``on_sent`` runs exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Sequence

log = logging.getLogger("kvstore.dataplane")

Buffers = Sequence[bytes | memoryview]
OnSent = Callable[[bool], None]  # called with True once sent, False if the connection died first
IOV_MAX = 512


class _Item:
    __slots__ = ("bufs", "nbytes", "on_sent")

    def __init__(self, bufs: list[memoryview], on_sent: OnSent | None, nbytes: int) -> None:
        self.bufs = bufs
        self.on_sent = on_sent
        self.nbytes = nbytes


class Sender:
    """A FIFO of frames written on a non-blocking duplicate of one connection's socket."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fileno: int,
        on_error: Callable[[OSError], None],
        on_bytes: Callable[[int], None],
    ) -> None:
        self._loop = loop
        self._sock = socket.socket(fileno=os.dup(fileno))
        self._sock.setblocking(False)
        self._fd = self._sock.fileno()
        self._on_error = on_error
        self._on_bytes = on_bytes
        self._queue: deque[_Item] = deque()
        self._writing = False
        self._closed = False
        self.queued_bytes = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def idle(self) -> bool:
        return not self._queue

    @property
    def queued_items(self) -> int:
        return len(self._queue)

    def send(self, bufs: Buffers, on_sent: OnSent | None = None) -> None:
        """Queue one frame (its buffers in order); sends at once when nothing is queued before it."""
        views = [memoryview(b).cast("B") for b in bufs if len(b)]
        nbytes = sum(v.nbytes for v in views)
        if self._closed:
            if on_sent is not None:
                on_sent(False)
            return
        self._queue.append(_Item(views, on_sent, nbytes))
        self.queued_bytes += nbytes
        self._idle.clear()
        if not self._writing:
            self._flush()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def close(self) -> None:
        """Stop sending; every queued frame's ``on_sent`` runs with False. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._fail_all()
        self._sock.close()

    def _flush(self) -> None:
        sock, queue = self._sock, self._queue
        while queue:
            item = queue[0]
            try:
                n = sock.sendmsg(item.bufs[:IOV_MAX])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._on_error(exc)
                self.close()
                return
            self._on_bytes(n)
            self.queued_bytes -= n
            if self._advance(item, n):
                queue.popleft()
                _notify(item, True)
        self._watch(bool(queue))

    @staticmethod
    def _advance(item: _Item, n: int) -> bool:
        """Drop ``n`` sent bytes from the front of ``item``; True when it is all sent."""
        bufs = item.bufs
        i = 0
        while i < len(bufs) and n >= bufs[i].nbytes:
            n -= bufs[i].nbytes
            i += 1
        del bufs[:i]
        if n:
            bufs[0] = bufs[0][n:]
        return not bufs

    def _watch(self, pending: bool) -> None:
        if pending and not self._writing:
            self._loop.add_writer(self._fd, self._flush)
            self._writing = True
        elif not pending:
            if self._writing:
                self._loop.remove_writer(self._fd)
                self._writing = False
            self._idle.set()

    def _fail_all(self) -> None:
        while self._queue:
            item = self._queue.popleft()
            _notify(item, False)
        self.queued_bytes = 0
        self._idle.set()


def _notify(item: _Item, ok: bool) -> None:
    if item.on_sent is not None:
        try:
            item.on_sent(ok)
        except Exception:  # a release callback must not stop the sender
            log.exception("on_sent callback failed")
