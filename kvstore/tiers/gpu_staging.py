"""Host<->device copies of the GPU tier: a pinned staging pool and double-buffered transfers.

A copy between device memory and a host buffer that is not page-locked runs
through a small pool of pinned host buffers (*slots*) owned by the tier, one
piece of at most ``slot_bytes`` at a time: while the copy engine moves piece
``i`` between a slot and the device, the CPU copies piece ``i + 1`` between
the caller's buffer and the other slot. Sources and destinations that are
already pinned (the CPU tier's arena) or on the device need no staging and
are copied directly. Every device copy runs on one dedicated stream, ordered
after the work already queued on the caller's current stream, so the
engine's compute stream is never blocked.

The device is reached through a :class:`DeviceBackend`: :class:`CudaBackend`
(torch CUDA tensors, a ``torch.cuda.Stream``, ``torch.cuda.Event`` marks) or
:class:`SimulatedBackend` (CPU tensors and a stream that runs its copies only
when a mark is waited on, as a GPU runs them some time after they are
queued). The scheduling and the pool's accounting are the same code on both,
so a transfer that reuses a slot before the device has finished with it
gives wrong bytes on the simulated backend too (tests/tiers/test_gpu.py).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kvstore.errors import InvalidInput, KVStoreError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class Piece:
    """``nbytes`` bytes at ``offset`` of a transfer: the unit one slot carries."""

    offset: int
    nbytes: int


def split(nbytes: int, piece_bytes: int) -> list[Piece]:
    """Consecutive pieces of at most ``piece_bytes`` covering ``nbytes``.

    Raises:
        InvalidInput: ``nbytes`` < 0 or ``piece_bytes`` < 1.
    """
    if nbytes < 0 or piece_bytes < 1:
        raise InvalidInput(f"cannot split {nbytes} bytes into pieces of {piece_bytes}")
    return [Piece(off, min(piece_bytes, nbytes - off)) for off in range(0, nbytes, piece_bytes)]


class Mark(Protocol):
    """A point in a copy stream: everything queued before it is done once :meth:`wait` returns."""

    def wait(self) -> None: ...


class CopyStream(Protocol):
    """The dedicated stream of device copies."""

    def follow_current(self) -> None:
        """Order later copies after the work queued so far on the caller's current stream."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Queue ``dst.copy_(src)`` (returns before it ran)."""

    def mark(self) -> Mark:
        """A mark after every copy queued so far."""


class DeviceBackend(Protocol):
    """Memory and a copy stream on one device."""

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 tensor in device memory."""

    def pinned_buffer(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 tensor in page-locked host memory."""

    def stream(self) -> CopyStream: ...

    def on_device(self, t: torch.Tensor) -> bool: ...

    def is_pinned(self, t: torch.Tensor) -> bool: ...


# ---------------------------------------------------------------- CUDA


class _CudaMark:
    __slots__ = ("event",)

    def __init__(self, event: torch.cuda.Event) -> None:
        self.event = event

    def wait(self) -> None:
        self.event.synchronize()


class _CudaStream:
    def __init__(self, device: torch.device) -> None:
        import torch

        self._torch = torch
        self._device = device
        self._stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]

    def follow_current(self) -> None:
        self._stream.wait_stream(self._torch.cuda.current_stream(self._device))

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with self._torch.cuda.stream(self._stream):
            dst.copy_(src, non_blocking=True)

    def mark(self) -> Mark:
        event = self._torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(self._stream)
        return _CudaMark(event)


class CudaBackend:
    """torch CUDA tensors on ``device``; page-locked host memory through torch's pinned allocator.

    Raises (at construction):
        InvalidInput: CUDA is not available, or ``device`` is not a CUDA device.
    """

    def __init__(self, device: str) -> None:
        try:
            import torch
        except ImportError:
            raise InvalidInput("the GPU tier needs torch with CUDA, which is not installed") from None
        if not torch.cuda.is_available():
            raise InvalidInput("the GPU tier needs CUDA, which is not available")
        self._torch = torch
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise InvalidInput(f"the GPU tier needs a CUDA device, got {device!r}")

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        return self._torch.empty(nbytes, dtype=self._torch.uint8, device=self.device)

    def pinned_buffer(self, nbytes: int) -> torch.Tensor:
        return self._torch.empty(nbytes, dtype=self._torch.uint8, pin_memory=True)

    def stream(self) -> CopyStream:
        return _CudaStream(self.device)

    def on_device(self, t: torch.Tensor) -> bool:
        return t.device.type == "cuda"

    def is_pinned(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and bool(t.is_pinned())


# ---------------------------------------------------------------- simulated on the CPU


class _SimMark:
    __slots__ = ("seq", "stream")

    def __init__(self, stream: _DeferredStream, seq: int) -> None:
        self.stream, self.seq = stream, seq

    def wait(self) -> None:
        self.stream.run_until(self.seq)


class _DeferredStream:
    """Copies queued in order and run only when a mark at or after them is waited on."""

    def __init__(self, log: list[str]) -> None:
        self._lock = threading.Lock()
        self._queued: deque[tuple[int, torch.Tensor, torch.Tensor]] = deque()
        self._seq = 0
        self._log = log

    def follow_current(self) -> None:
        """Nothing to follow: simulated callers have no stream of their own."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with self._lock:
            self._seq += 1
            self._queued.append((self._seq, dst, src))
            self._log.append(f"queue {self._seq}")

    def mark(self) -> Mark:
        with self._lock:
            return _SimMark(self, self._seq)

    def run_until(self, seq: int) -> None:
        with self._lock:
            while self._queued and self._queued[0][0] <= seq:
                n, dst, src = self._queued.popleft()
                dst.copy_(src)
                self._log.append(f"run {n}")


class SimulatedBackend:
    """CPU tensors standing in for device and pinned memory, and a deferred copy stream.

    Tensors made by :meth:`device_buffer` count as device memory and those of
    :meth:`pinned_buffer` as pinned host memory (by address range); every
    other tensor is pageable host memory. ``log`` records each queued and
    each executed device copy, in order.
    """

    def __init__(self) -> None:
        import torch

        self._torch = torch
        self._ranges: list[tuple[int, int, str]] = []  # (start, end, "device" | "pinned")
        self._keep: list[torch.Tensor] = []
        self.log: list[str] = []

    def _made(self, nbytes: int, kind: str) -> torch.Tensor:
        t = self._torch.empty(nbytes, dtype=self._torch.uint8)
        self._keep.append(t)
        self._ranges.append((t.data_ptr(), t.data_ptr() + nbytes, kind))
        return t

    def _kind(self, t: torch.Tensor) -> str:
        ptr = t.data_ptr()
        return next((k for start, end, k in self._ranges if start <= ptr < end), "pageable")

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        return self._made(nbytes, "device")

    def pinned_buffer(self, nbytes: int) -> torch.Tensor:
        return self._made(nbytes, "pinned")

    def stream(self) -> CopyStream:
        return _DeferredStream(self.log)

    def on_device(self, t: torch.Tensor) -> bool:
        return self._kind(t) == "device"

    def is_pinned(self, t: torch.Tensor) -> bool:
        return self._kind(t) == "pinned"


# ---------------------------------------------------------------- the staging pool


class StagingLease:
    """Slots held by one transfer; :meth:`release` gives them back once (a second call is harmless)."""

    __slots__ = ("_held", "_pool")

    def __init__(self, pool: StagingPool, held: dict[int, torch.Tensor]) -> None:
        self._pool = pool
        self._held = held

    @property
    def buffers(self) -> list[torch.Tensor]:
        return list(self._held.values())

    def release(self) -> None:
        held, self._held = self._held, {}
        if held:
            self._pool._give_back(held)


class StagingPool:
    """``slots`` pinned host buffers of ``slot_bytes`` each, allocated once, lent to transfers.

    Invariants: every slot is either free or held by exactly one lease;
    ``free + leased == slots``; a lease takes all the slots it asks for at
    once (so two transfers never wait on each other's half-taken slots); a
    slot given back twice raises.
    """

    def __init__(self, backend: DeviceBackend, slots: int, slot_bytes: int) -> None:
        if slots < 1 or slot_bytes < 1:
            raise InvalidInput(
                f"a staging pool needs slots >= 1 and slot_bytes >= 1, got {slots}, {slot_bytes}"
            )
        self.slot_bytes = slot_bytes
        self._buffers = [backend.pinned_buffer(slot_bytes) for _ in range(slots)]
        self._free: list[int] = list(range(slots))
        self._cond = threading.Condition()
        self.leases = 0
        self.waits = 0

    @property
    def slots(self) -> int:
        return len(self._buffers)

    @property
    def free(self) -> int:
        with self._cond:
            return len(self._free)

    def lease(self, count: int) -> StagingLease:
        """Take ``count`` slots, waiting until that many are free.

        Raises:
            InvalidInput: ``count`` is not in 1..slots.
        """
        if not 1 <= count <= len(self._buffers):
            raise InvalidInput(f"a lease of {count} slots from a pool of {len(self._buffers)}")
        with self._cond:
            if len(self._free) < count:
                self.waits += 1
                self._cond.wait_for(lambda: len(self._free) >= count)
            taken = [self._free.pop() for _ in range(count)]
            self.leases += 1
        return StagingLease(self, {i: self._buffers[i] for i in taken})

    def _give_back(self, held: dict[int, torch.Tensor]) -> None:
        with self._cond:
            for i in held:
                if i in self._free:
                    raise KVStoreError(f"staging slot {i} given back twice")
                self._free.append(i)
            self._cond.notify_all()


# ---------------------------------------------------------------- transfers


@dataclass(slots=True)
class CopyStats:
    """Bytes moved by a :class:`StagedCopier`, by route. Mutated only by the copier."""

    direct_bytes: int = 0
    staged_bytes: int = 0
    staged_pieces: int = 0


class StagedCopier:
    """Copies between flat uint8 tensors anywhere, on one copy stream; staged where needed.

    ``depth`` slots per staged transfer (2: double buffering). Every copy has
    completed when :meth:`copy` returns, so the caller may reuse or free
    both buffers at once.
    """

    def __init__(self, backend: DeviceBackend, pool: StagingPool, depth: int = 2) -> None:
        if depth < 1:
            raise InvalidInput(f"staging depth must be >= 1, got {depth}")
        self.backend = backend
        self.pool = pool
        self.depth = min(depth, pool.slots)
        self.stream = backend.stream()
        self.stats = CopyStats()
        self._lock = threading.Lock()

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst[:src.numel()] = src`` for flat uint8 tensors, one of which is on the device.

        Raises:
            InvalidInput: ``dst`` is smaller than ``src`` or neither is on the device.
        """
        n = src.numel()
        if dst.numel() < n:
            raise InvalidInput(f"copy of {n} bytes into a buffer of {dst.numel()}")
        b = self.backend
        src_dev, dst_dev = b.on_device(src), b.on_device(dst)
        if not (src_dev or dst_dev):
            raise InvalidInput("a device copy needs its source or its destination on the device")
        self.stream.follow_current()
        if src_dev and dst_dev or (b.is_pinned(src) if dst_dev else b.is_pinned(dst)):
            self.stream.copy(dst[:n], src)
            self.stream.mark().wait()
            self._count(n, staged=False, pieces=0)
            return
        pieces = split(n, self.pool.slot_bytes)
        with self._lease(len(pieces)) as slots:
            if dst_dev:
                self._stage_in(dst, src, pieces, slots)
            else:
                self._stage_out(dst, src, pieces, slots)
        self._count(n, staged=True, pieces=len(pieces))

    @contextmanager
    def _lease(self, pieces: int) -> Iterator[list[torch.Tensor]]:
        lease = self.pool.lease(max(1, min(self.depth, pieces)))
        try:
            yield lease.buffers
        finally:
            lease.release()

    def _stage_in(
        self, dst: torch.Tensor, src: torch.Tensor, pieces: list[Piece], slots: list[torch.Tensor]
    ) -> None:
        """Host -> device: fill slot i % depth on the CPU once the device has drained it, queue its upload."""
        marks: list[Mark | None] = [None] * len(slots)
        try:
            for i, p in enumerate(pieces):
                j = i % len(slots)
                if (m := marks[j]) is not None:
                    m.wait()
                buf = slots[j][: p.nbytes]
                buf.copy_(src[p.offset : p.offset + p.nbytes])
                self.stream.copy(dst[p.offset : p.offset + p.nbytes], buf)
                marks[j] = self.stream.mark()
        finally:
            self.stream.mark().wait()  # the slots go back to the pool only once the device read them

    def _stage_out(
        self, dst: torch.Tensor, src: torch.Tensor, pieces: list[Piece], slots: list[torch.Tensor]
    ) -> None:
        """Device -> host: queue downloads ``depth`` pieces ahead; drain the oldest into ``dst`` on the CPU."""
        queued: deque[tuple[Piece, torch.Tensor, Mark]] = deque()

        def drain() -> None:
            p, buf, m = queued.popleft()
            m.wait()
            dst[p.offset : p.offset + p.nbytes].copy_(buf)

        try:
            for i, p in enumerate(pieces):
                if len(queued) == len(slots):
                    drain()
                buf = slots[i % len(slots)][: p.nbytes]
                self.stream.copy(buf, src[p.offset : p.offset + p.nbytes])
                queued.append((p, buf, self.stream.mark()))
            while queued:
                drain()
        finally:
            self.stream.mark().wait()

    def _count(self, n: int, staged: bool, pieces: int) -> None:
        with self._lock:
            if staged:
                self.stats.staged_bytes += n
                self.stats.staged_pieces += pieces
            else:
                self.stats.direct_bytes += n
