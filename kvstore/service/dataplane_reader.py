"""Incoming bytes -> frames, with payloads received straight into their destination.

:class:`FrameReader` backs an ``asyncio.BufferedProtocol``: it hands the
transport either its scratch buffer (prefixes, headers and small payloads
land there) or the current destination of a payload (a reserved extent of the
CPU arena, a request's bytes, or a bounded discard buffer), so a chunk put
over the network is copied once, by the kernel, into the arena. Payload
bytes that arrived in the scratch buffer behind a header are moved to the
destination first (at most one scratch buffer's worth).

Invariants: ``start <= end <= len(scratch)``; while a payload sink is open
every byte goes to it until it has exactly the payload's length; memory per
connection is bounded by the scratch buffer (grown at most to one header) and
by the sinks, which the connection sizes under its in-flight limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import xxhash

from kvstore.service.protocol import PREFIX_BYTES, Prefix, unpack_prefix

SCRATCH_BYTES = 256 << 10
DISCARD_BYTES = 256 << 10


class Sink(Protocol):
    """A payload destination that accepts exactly ``remaining`` more bytes."""

    remaining: int

    def buffer(self) -> memoryview:
        """Where the next bytes go (non-empty while ``remaining`` > 0)."""

    def advance(self, n: int) -> None:
        """``n`` bytes were written at the start of the last :meth:`buffer`."""


class DiscardSink:
    """Swallows a payload that is not wanted (an error was already answered); bounded memory."""

    _scratch = memoryview(bytearray(DISCARD_BYTES))

    def __init__(self, n: int) -> None:
        self.remaining = n

    def buffer(self) -> memoryview:
        return self._scratch[: min(self.remaining, DISCARD_BYTES)]

    def advance(self, n: int) -> None:
        self.remaining -= n


class BytesSink:
    """Collects a small payload (lookup tokens, a put into a tier without a host arena)."""

    def __init__(self, n: int) -> None:
        self.data = bytearray(n)
        self._view = memoryview(self.data)
        self._pos = 0
        self.remaining = n

    def buffer(self) -> memoryview:
        return self._view[self._pos :]

    def advance(self, n: int) -> None:
        self._pos += n
        self.remaining -= n


class SegmentSink:
    """Fills a list of destinations in order, hashing each (XXH3-128) as its bytes arrive.

    A destination of None is skipped (its bytes are discarded and not hashed);
    ``trailer`` extra bytes at the end are collected apart (trailing checksums).
    Hashing right after the kernel copied the bytes in reads them from cache.
    """

    def __init__(self, segments: list[memoryview | None], sizes: list[int], trailer: int) -> None:
        self._segments = segments
        self._sizes = sizes
        self._i = 0
        self._pos = 0
        self._hash = xxhash.xxh3_128()
        self.digests: list[bytes] = []
        self.trailer = BytesSink(trailer)
        self.remaining = sum(sizes) + trailer
        self._skip_empty()

    def buffer(self) -> memoryview:
        if self._i >= len(self._sizes):
            return self.trailer.buffer()
        seg = self._segments[self._i]
        if seg is None:
            return DiscardSink(self._sizes[self._i] - self._pos).buffer()
        return seg[self._pos : self._sizes[self._i]]

    def advance(self, n: int) -> None:
        self.remaining -= n
        if self._i >= len(self._sizes):
            self.trailer.advance(n)
            return
        seg = self._segments[self._i]
        if seg is not None:
            self._hash.update(seg[self._pos : self._pos + n])
        self._pos += n
        if self._pos == self._sizes[self._i]:
            self.digests.append(self._hash.digest() if seg is not None else b"")
            self._hash.reset()
            self._i += 1
            self._pos = 0
            self._skip_empty()

    def _skip_empty(self) -> None:
        while self._i < len(self._sizes) and self._sizes[self._i] == 0:
            self.digests.append(b"")
            self._i += 1


class FrameHandler(Protocol):
    """What the reader calls as frames arrive (the connection)."""

    def on_frame(self, prefix: Prefix, header: memoryview) -> Sink | None:
        """A frame's prefix and header arrived; return the sink for its payload (None if empty)."""

    def on_payload(self, sink: Sink) -> None:
        """The sink returned by :meth:`on_frame` is full."""


class FrameReader:
    """Splits the byte stream of one connection into frames; see the module docstring."""

    def __init__(self, handler: FrameHandler, max_payload: int, on_bytes: Callable[[int], None]) -> None:
        self._handler = handler
        self._max_payload = max_payload
        self._on_bytes = on_bytes
        self._scratch = bytearray(SCRATCH_BYTES)
        self._view = memoryview(self._scratch)
        self._start = 0
        self._end = 0
        self._sink: Sink | None = None
        self._need = PREFIX_BYTES  # bytes the frame being parsed needs in scratch

    @property
    def mid_frame(self) -> bool:
        """True when part of a frame has arrived and the rest has not."""
        return self._sink is not None or self._end > self._start

    def describe_partial(self) -> str:
        if self._sink is not None:
            return f"{self._sink.remaining} payload bytes still missing"
        return f"{self._end - self._start} of {self._need} prefix+header bytes received"

    def get_buffer(self) -> memoryview:
        if self._sink is not None:
            return self._sink.buffer()
        if self._end == len(self._scratch):
            self._make_room()
        return self._view[self._end :]

    def buffer_updated(self, n: int) -> None:
        """Consume ``n`` new bytes; raises ProtocolError on a frame that cannot be resynchronised."""
        self._on_bytes(n)
        sink = self._sink
        if sink is not None:
            sink.advance(n)
            if sink.remaining == 0:
                self._sink = None
                self._handler.on_payload(sink)
        else:
            self._end += n
        self._parse()

    def _parse(self) -> None:
        while self._sink is None:
            avail = self._end - self._start
            if avail < PREFIX_BYTES:
                self._need = PREFIX_BYTES
                break
            s = self._start
            prefix = unpack_prefix(self._view[s : s + PREFIX_BYTES], self._max_payload)
            self._need = PREFIX_BYTES + prefix.header_len
            if avail < self._need:
                if self._need > len(self._scratch) - self._start:
                    self._make_room()  # the rest of this header must fit behind what arrived
                break
            header = self._view[s + PREFIX_BYTES : s + self._need]
            self._start += self._need
            sink = self._handler.on_frame(prefix, header)
            if prefix.payload_len:
                self._sink = sink if sink is not None else DiscardSink(prefix.payload_len)
                self._feed_from_scratch()
        if self._start == self._end:
            self._start = self._end = 0

    def _feed_from_scratch(self) -> None:
        """Move payload bytes that arrived in scratch into the sink just opened."""
        sink = self._sink
        while sink is not None and sink.remaining and self._end > self._start:
            dst = sink.buffer()
            n = min(len(dst), self._end - self._start)
            dst[:n] = self._view[self._start : self._start + n]
            self._start += n
            sink.advance(n)
        if sink is not None and sink.remaining == 0:
            self._sink = None
            self._handler.on_payload(sink)

    def _make_room(self) -> None:
        """Move the unparsed bytes to the front; grow the scratch for a header larger than it."""
        pending = self._end - self._start
        size = max(SCRATCH_BYTES, self._need, pending)
        if size > len(self._scratch):
            fresh = bytearray(size)
            fresh[:pending] = self._view[self._start : self._end]
            self._scratch, self._view = fresh, memoryview(fresh)
        elif self._start:
            self._scratch[:pending] = self._scratch[self._start : self._end]
        self._start, self._end = 0, pending
