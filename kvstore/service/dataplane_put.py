"""Puts: received straight into reserved CPU-arena extents, verified, then committed.

Over a socket (PUT) the payload goes by the kernel straight into extents
reserved for it (:func:`begin_put` returns the sink the reader fills), each
chunk hashed as its bytes arrive; :func:`finish_put` compares the digests
with the checksums the client sent (in the header, or trailing the payload)
and commits - or gives every extent back if any chunk differs. Through shared
memory (SHM_RESERVE / SHM_COMMIT) the client writes the extents itself and
the daemon hashes them before it commits, since another process wrote them.

Either way the reservation is recorded in the connection's session until it
is committed or aborted, so a client that disappears mid-put leaves nothing.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from kvstore.checksum import checksum
from kvstore.errors import ChunkCorrupt, ChunkTooLarge, InvalidInput, LeaseError
from kvstore.keys import ChunkKey, Namespace
from kvstore.service.dataplane_core import Reply, Result
from kvstore.service.dataplane_handlers import Ctx
from kvstore.service.dataplane_reader import BytesSink, SegmentSink, Sink
from kvstore.service.dataplane_session import Reservation, Slot
from kvstore.service.dataplane_store import StoreAccess
from kvstore.service.dataplane_xput import XPutRequest, checked, store_checked, stores_of
from kvstore.service.protocol import (
    CHECKSUM_BYTES,
    MAX_CODEC_NAME,
    Forbidden,
    PayloadTooLarge,
    ServerBusy,
    field_bool,
    field_checksums,
    field_float,
    field_int,
    field_ints,
    field_keys,
    field_sizes,
)


@dataclass(slots=True)
class PendingPut:
    """A PUT whose payload is arriving: where it goes and what it must hash to."""

    ns: Namespace
    keys: list[ChunkKey]
    sizes: list[int]
    checksums: list[bytes] | None  # None: they trail the payload
    cost: float
    reservation: int | None  # None: a top tier without a host arena (bytes are copied in)
    sink: Sink
    payload_len: int


def begin_put(ctx: Ctx, h: dict[str, Any], payload_len: int) -> PendingPut:
    """Validate a PUT header, take its in-flight bytes, reserve its extents; the payload's sink.

    Raises:
        InvalidInput, UnknownNamespace, ChunkTooLarge, PayloadTooLarge, ServerBusy.
    """
    ns, keys = ctx.namespace(h), [ChunkKey(k) for k in field_keys(h)]
    trailer = CHECKSUM_BYTES * len(keys) if field_bool(h, "checksum_trailer", False) else 0
    sizes = field_sizes(h, len(keys), payload_len, trailer)
    checksums = None if trailer else field_checksums(h, len(keys))
    cost = field_float(h, "cost", 1.0) or 0.0
    _check_sizes(ctx, sizes)
    access = ctx.core.access
    ctx.budget.take(payload_len)
    if access.arena is None:
        return PendingPut(ns, keys, sizes, checksums, cost, None, BytesSink(payload_len), payload_len)
    try:
        slots = _reserve(ctx, ns, keys, sizes)
    except BaseException:
        ctx.budget.give(payload_len)
        raise
    rid = ctx.session.open_reservation(ns, slots, ctx.core.config.reservation_ttl_s)
    segments = [None if s.extent is None else access.region(s.extent).data for s in slots]
    return PendingPut(
        ns, keys, sizes, checksums, cost, rid, SegmentSink(segments, sizes, trailer), payload_len
    )


BACKLOG_RETRY_S = 0.05
"""What a BUSY for a full write-through queue tells the client to wait before retrying."""


def _room_in_queue(access: StoreAccess, deadline: float) -> bool:
    """Wait (on a worker thread) until the write-through queue has room; False at ``deadline``."""
    while access.write_queue_full():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _check_sizes(ctx: Ctx, sizes: list[int]) -> None:
    access = ctx.core.access
    limit = min(access.store.config.max_chunk_bytes, access.top.capacity_bytes)
    for size in sizes:
        if size > limit:
            raise ChunkTooLarge(f"chunk of {size} bytes exceeds the store's limit of {limit}")


PINNED_RETRY_S = 0.1
"""What a BUSY reply suggests while queued lower-tier writes pin the top tier (each takes milliseconds)."""


def _reserve(ctx: Ctx, ns: Namespace, keys: list[ChunkKey], sizes: list[int]) -> list[Slot]:
    """One slot per key: an extent to fill, or none (already stored, or no room).

    Raises:
        ServerBusy: no room while lower-tier writes still pin top-tier chunks (the room comes back when
            they finish; ``TieredStore.put`` waits for them, this path runs on the event loop and must not):
            nothing is reserved, a retry stores the chunks.
    """
    access = ctx.core.access
    slots: list[Slot] = []
    try:
        for key, size in zip(keys, sizes):
            if access.top.meta(key) is not None:
                slots.append(Slot(key, None, size, present=True))
                continue
            extent = access.reserve(size)
            if extent is None and access.writes_pending():
                raise ServerBusy(
                    "the top tier is full of chunks still being written to the lower tiers; retry",
                    PINNED_RETRY_S,
                )
            slots.append(Slot(key, extent, size))
    except BaseException:
        for slot in slots:
            if slot.extent is not None:
                access.abort(slot.extent)
        raise
    return slots


def finish_put(ctx: Ctx, put: PendingPut) -> Result:
    """The payload is in: verify every chunk against its checksum, then commit (or abort all)."""
    ctx.budget.give(put.payload_len)
    access = ctx.core.access
    if put.reservation is None:
        assert isinstance(put.sink, BytesSink)  # begin_put pairs a None reservation with a BytesSink
        return _put_copied(ctx, put, put.sink.data)
    assert isinstance(put.sink, SegmentSink)
    res = ctx.session.take_reservation(put.reservation)
    sink = put.sink
    expected = put.checksums if put.checksums is not None else _split(bytes(sink.trailer.data), len(put.keys))
    bad = [i for i, s in enumerate(res.slots) if s.extent is not None and sink.digests[i] != expected[i]]
    if bad:
        ctx.session.abort(res)
        raise ChunkCorrupt(f"chunk(s) {bad[:8]} of the PUT failed their checksum; nothing was stored")

    def run() -> Reply:
        return Reply({"stored": _commit(ctx, res, expected, put.cost)})

    return ctx.core.offload(run) if access.layered else run()


def _put_copied(ctx: Ctx, put: PendingPut, data: bytearray) -> Result:
    arr = np.frombuffer(data, dtype=np.uint8)
    offs = [0, *itertools.accumulate(put.sizes)]
    expected = put.checksums or _split(bytes(data[offs[-1] :]), len(put.keys))
    chunks = [arr[a:b] for a, b in itertools.pairwise(offs)]
    bad = [i for i, c in enumerate(chunks) if checksum(c) != expected[i]]
    if bad:
        raise ChunkCorrupt(f"chunk(s) {bad[:8]} of the PUT failed their checksum; nothing was stored")
    access = ctx.core.access

    def run() -> Reply:
        return Reply({"stored": [access.put_copy(put.ns, k, c, put.cost) for k, c in zip(put.keys, chunks)]})

    return ctx.core.offload(run) if access.layered else run()


def _split(trailer: bytes, n: int) -> list[bytes]:
    return [trailer[i * CHECKSUM_BYTES : (i + 1) * CHECKSUM_BYTES] for i in range(n)]


def _commit(ctx: Ctx, res: Reservation, digests: list[bytes], cost: float) -> list[bool]:
    """Commit every filled slot of a verified reservation; what each key's put achieved.

    While the write-through queue is full (a slow lower tier) the commit
    waits for room, ``queue_timeout_s`` at most for the whole PUT (not per
    chunk); past that it answers BUSY: the chunks committed so far stay
    stored, the rest are given back, and a retry stores them (puts are
    idempotent).

    Raises:
        ServerBusy: the queue stayed full for ``queue_timeout_s``.
    """
    access = ctx.core.access
    stored: list[bool] = []
    deadline = time.monotonic() + access.store.config.queue_timeout_s
    try:
        for slot, digest in zip(res.slots, digests):
            if slot.extent is not None and not _room_in_queue(access, deadline):
                raise ServerBusy(
                    f"the write-through queue to the lower tiers stayed full (a slow tier); "
                    f"{sum(stored)} of {len(res.slots)} chunks stored, retry the rest",
                    BACKLOG_RETRY_S,
                )
            extent, slot.extent = slot.extent, None
            if extent is None:
                stored.append(slot.present)
            else:
                stored.append(access.commit(res.ns, slot.key, extent, slot.size, digest, cost))
    finally:
        ctx.session.abort(res)  # gives back what a failed commit left (nothing when all went well)
    return stored


def shm_reserve(ctx: Ctx, h: dict[str, Any], payload: bytes | None) -> Result:
    """Reserve extents a same-host client fills through its mapping of the arena."""
    if not ctx.session.shm_offered:
        raise Forbidden("shared memory is not offered on this connection (Unix socket, same uid, HELLO shm)")
    ns, keys = ctx.namespace(h), [ChunkKey(k) for k in field_keys(h)]
    sizes = field_ints(h, "sizes", len(keys), lo=1)
    _check_sizes(ctx, sizes)
    total, limit = sum(sizes), ctx.budget.limit
    held = sum(s.size for r in ctx.session.reservations.values() for s in r.slots if s.extent is not None)
    if total > limit:
        raise PayloadTooLarge(
            f"reservation of {total} bytes exceeds the connection's in-flight limit {limit}"
        )
    if held + total > limit:
        raise ServerBusy(
            f"this connection holds {held} reserved bytes; {total} more would exceed {limit}", 0.01
        )
    slots = _reserve(ctx, ns, keys, sizes)
    offsets = [s.extent.offset if s.extent is not None else (-1 if s.present else -2) for s in slots]
    if not any(s.extent is not None for s in slots):
        return Reply({"reservation": None, "offsets": offsets})
    rid = ctx.session.open_reservation(ns, slots, ctx.core.config.reservation_ttl_s)
    return Reply({"reservation": rid, "offsets": offsets})


def shm_written(ctx: Ctx, h: dict[str, Any], payload: bytes | None) -> Result:
    """The client has written bytes [0, upto) of one slot: hash them now, while the client writes the rest."""
    rid = field_int(h, "reservation", 1)
    res = ctx.session.reservations.get(rid)
    if res is None:
        raise LeaseError(f"reservation {rid} is unknown, committed or expired")
    slot = res.slots[field_int(h, "index", 0, len(res.slots) - 1)]
    upto = field_int(h, "upto", 0, slot.size)
    if slot.extent is None:
        raise InvalidInput("that slot of the reservation has nothing to write")
    if upto > slot.hashed:
        if slot.hasher is None:
            slot.hasher = xxhash.xxh3_128()
        slot.hasher.update(ctx.core.access.region(slot.extent)[slot.hashed : upto].data)
        slot.hashed = upto
    return Reply({"hashed": slot.hashed})


def _digest_of(ctx: Ctx, slot: Slot) -> bytes:
    """XXH3-128 of a filled slot, finishing a hash that SHM_WRITTEN began."""
    assert slot.extent is not None  # callers pass filled slots only
    region = ctx.core.access.region(slot.extent)
    if slot.hasher is None:
        return checksum(region[: slot.size])
    slot.hasher.update(region[slot.hashed : slot.size].data)
    return slot.hasher.digest()


def shm_commit(ctx: Ctx, h: dict[str, Any], payload: bytes | None) -> Result:
    """Verify what the client wrote into its reservation, then commit it (or give it all back)."""
    res = ctx.session.take_reservation(field_int(h, "reservation", 1))
    if field_bool(h, "abort", False):
        ctx.session.abort(res)
        return Reply({"stored": [s.present for s in res.slots]})
    try:
        cost = field_float(h, "cost", 1.0) or 0.0
        if h.get("checksums") is None:
            # The writer is this daemon's own user with the arena mapped writable: a digest it
            # sends would guard against nothing it could not do anyway. The chunk's checksum is
            # computed from the arena when first needed (the CPU tier's lazy checksum).
            digests = [b""] * len(res.slots)
            bad = []
        else:
            digests = field_checksums(h, len(res.slots))
            bad = [
                i
                for i, (s, d) in enumerate(zip(res.slots, digests))
                if s.extent is not None and _digest_of(ctx, s) != d
            ]
        if bad:
            raise ChunkCorrupt(
                f"chunk(s) {bad[:8]} of the reservation failed their checksum; nothing was stored"
            )
    except BaseException:
        ctx.session.abort(res)
        raise

    def run() -> Reply:
        return Reply({"stored": _commit(ctx, res, digests, cost)})

    return ctx.core.offload(run) if ctx.core.access.layered else run()


# -- transfers between daemons (HAVE, XPUT) ------------------------------------------------
def have(ctx: Ctx, h: dict[str, Any], payload: bytes | None) -> Result:
    """Which of the keys this namespace holds in any tier (a transfer resumes with the rest).

    ``stores`` lists the codec and container params each of the namespace's encoded tiers
    writes for a full chunk: an XPUT container with exactly those is stored as it is.
    """
    ns, keys, access = ctx.namespace(h), [ChunkKey(k) for k in field_keys(h)], ctx.core.access

    def run() -> Reply:
        present = [access.owned(ns, k) and access.store.contains(ns, k) for k in keys]
        return Reply({"present": present, "stores": stores_of(access, ns)})

    return ctx.core.offload(run) if access.layered else run()


def parse_xput(ctx: Ctx, h: dict[str, Any], payload_len: int) -> XPutRequest:
    """Validate an XPUT header against its payload length.

    Raises:
        InvalidInput, UnknownNamespace, ChunkTooLarge.
    """
    ns, keys = ctx.namespace(h), [ChunkKey(k) for k in field_keys(h)]
    sizes = field_sizes(h, len(keys), payload_len)
    _check_sizes(ctx, sizes)
    codecs = h.get("codecs")
    if not isinstance(codecs, list) or len(codecs) != len(keys):
        raise InvalidInput(f"field 'codecs' must list {len(keys)} codec names ('raw' for raw bytes)")
    for name in codecs:
        if not isinstance(name, str) or not 0 < len(name) <= MAX_CODEC_NAME:
            raise InvalidInput("field 'codecs' must hold codec names")
    raw = h.get("raw_checksums", [None] * len(keys))
    if not isinstance(raw, list) or len(raw) != len(keys):
        raise InvalidInput(f"field 'raw_checksums' must list {len(keys)} checksums or nils")
    for c in raw:
        if c is not None and (not isinstance(c, bytes) or len(c) != CHECKSUM_BYTES):
            raise InvalidInput(f"field 'raw_checksums' must hold {CHECKSUM_BYTES}-byte digests or nils")
    cost = field_float(h, "cost", 1.0) or 0.0
    return XPutRequest(ns, keys, sizes, field_checksums(h, len(keys)), codecs, raw, cost)


def xput(ctx: Ctx, h: dict[str, Any], payload: bytes | None) -> Result:
    """Store chunks sent by another daemon, each raw or in a codec container.

    Every chunk is checked before anything is stored: the bytes that arrived
    against their checksum (else CHECKSUM: resend), a container's own checks
    (every section's checksum) and spec (another spec than the namespace's is
    BAD_REQUEST), its size (whole tokens) and, where the sender gave one and
    the chunk is decoded here, the decoded bytes' checksum. A container that
    one of the namespace's encoded tiers writes exactly so (codec and params)
    is stored there as it is, without decoding (``encoded[i]`` in the reply);
    the others are decoded, on the worker threads, and stored raw.
    """
    req = parse_xput(ctx, h, len(payload or b""))
    data = memoryview(payload or b"")
    offs = [0, *itertools.accumulate(req.sizes)]
    parts = [np.frombuffer(data[a:b], dtype=np.uint8) for a, b in itertools.pairwise(offs)]
    bad = [i for i, (p, c) in enumerate(zip(parts, req.checksums)) if checksum(p) != c]
    if bad:
        raise ChunkCorrupt(f"chunk(s) {bad[:8]} of the XPUT failed their checksum; nothing was stored")
    access = ctx.core.access

    def run() -> Reply:
        t0 = time.perf_counter()
        ready = [checked(access, req, i, p) for i, p in enumerate(parts)]
        check_s = time.perf_counter() - t0
        return Reply(store_checked(access, req, ready).reply(check_s))

    return ctx.core.offload(run)
