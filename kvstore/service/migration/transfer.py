"""Daemon-to-daemon transfers of a namespace's chunks: push (XPUT to a peer) and pull (GET from one).

A push reads each chunk from the local store, asks the planner which codec
to send it with (per chunk, with the link's latest estimate), and sends it
in an XPUT; ``window`` chunks are in flight at once. The peer verifies every
chunk before storing it (docs/protocol.md, XPUT); a chunk it reports corrupt
is sent again (``max_resends``), then the transfer fails. A dropped
connection is resumed: the transfer reconnects (``max_reconnects``, with
backoff), asks the peer which of the remaining keys it already holds (HAVE)
and sends only the rest. A pull GETs chunks raw with checksum verification
and stores them locally, skipping what the local store already holds.

Both sides must agree on the tenant: keys are derived from the namespace,
which names its tenant, so the peer's token must belong to the namespace's
tenant (or the peer must run without tokens).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from kvstore.buffers import U8
from kvstore.checksum import checksum
from kvstore.client import _frames as F
from kvstore.client.aio import AsyncClient
from kvstore.errors import ChunkCorrupt, InvalidInput, KVStoreError, RemoteUnavailable
from kvstore.keys import ChunkKey, Namespace
from kvstore.service.migration import handoff_push
from kvstore.service.migration.link import AckClock, CoderRates, LinkEstimator
from kvstore.service.migration.planner import CodecOption, Plan, PlanInput, plan
from kvstore.service.migration.progress import ChunkSent, TransferProgress
from kvstore.service.migration import transfer_wire as wire
from kvstore.service.migration.transfer_codecs import held_encoded, payload, peer_stores
from kvstore.service.migration.transfer_peers import PeerKey, PeerPool, PeerSession
from kvstore.service.migration.transfer_wire import PeerStore
from kvstore.service.protocol import Forbidden, MsgType
from kvstore.tiers.store import TieredStore

log = logging.getLogger("kvstore.transfer")
READ_STAGE = "(read)"  # CoderRates' entry for reading a raw chunk, which every option's sender stage starts with
LOSSLESS = frozenset({"raw", "lossless"})
HAVE_BATCH = 4096
DEADLINE_MARGIN = 0.9
"""The planner aims at this share of the time left. Its projections count the pipeline's fill and drain,
the round trips and the coders' speeds seen in transfers, but the link estimate is a smoothed average of
a shared machine's throughput: a plan that fits exactly misses about half the time."""


class TransferFailed(KVStoreError):
    """A transfer gave up: the peer stayed unreachable, refused the chunks, or kept corrupting one."""


@dataclass(frozen=True, slots=True)
class TransferRequest:
    """What to move, where, and how.

    Attributes:
        peer_url: the other daemon's data plane (``kvstore://host:port``, ``kvstores://`` for TLS).
        namespace: the namespace (the same on both daemons).
        keys: the chunks, in order.
        direction: ``push`` (local -> peer) or ``pull`` (peer -> local).
        token: bearer token for the peer (its tenant must be the namespace's).
        deadline_s: seconds the transfer should take at most (the planner's target), or None.
        codec_options: measured candidates for the planner (push; empty: raw only).
        recompute_s: the caller's estimate of recomputing the KV instead (for the planner's report).
        tls: speak TLS to the peer; tls_ca: the CA file to trust (None: the system's).
        window: chunks in flight at once.
        max_reconnects: reconnect attempts after a dropped connection before giving up.
        max_resends: times one chunk is sent again after the peer found it corrupt.
        timeout_s: per request to the peer.
        announce_ttl_s: a push first ANNOUNCEs the chunks it will send, for this long, so that a
            lookup on the peer waits for them (docs/migration.md, section 9); None: no announcement.
    """

    peer_url: str
    namespace: Namespace
    keys: tuple[ChunkKey, ...]
    direction: Literal["push", "pull"] = "push"
    token: str | None = None
    deadline_s: float | None = None
    codec_options: tuple[CodecOption, ...] = ()
    recompute_s: float | None = None
    tls: bool = False
    tls_ca: str | None = None
    window: int = 4
    max_reconnects: int = 5
    max_resends: int = 3
    timeout_s: float = 30.0
    announce_ttl_s: float | None = 120.0

    def __post_init__(self) -> None:
        if self.direction not in ("push", "pull"):
            raise InvalidInput(f"direction must be 'push' or 'pull', got {self.direction!r}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise InvalidInput("deadline_s must be > 0")
        if not 1 <= self.window <= 64 or self.max_reconnects < 0 or self.max_resends < 0:
            raise InvalidInput("window must be in [1, 64]; max_reconnects and max_resends >= 0")
        if not self.timeout_s > 0 or not (self.announce_ttl_s is None or self.announce_ttl_s > 0):
            raise InvalidInput("timeout_s and announce_ttl_s must be > 0")


async def run(store: TieredStore, req: TransferRequest, progress: TransferProgress, link: LinkEstimator,
              peers: PeerPool | None = None, coders: CoderRates | None = None) -> None:
    """Run a transfer to its end, resuming after dropped connections; ``progress`` follows it.

    ``peers``: a pool to take the peer's connection from and give it back to after a push that
    succeeded (None: a connection of its own, closed at the end). ``coders``: the codecs' moving
    estimates to plan with and to feed (None: this transfer's own, seeded by the measurement).

    Raises:
        TransferFailed: the peer stayed unreachable, or a chunk kept failing its checks.
        Unauthorized, Forbidden, InvalidInput, UnknownNamespace, TLSError: refusals a retry cannot change.
    """
    key = PeerKey(req.peer_url, req.token, req.tls, req.tls_ca, req.timeout_s)
    pooled = peers is not None and req.direction == "push"
    session = await peers.take(key) if pooled and peers is not None else PeerSession.open(
        key, verify=req.direction == "pull")
    rates = coders if coders is not None else CoderRates()
    attempt, ok = 0, False
    try:
        while True:
            try:
                if req.direction == "push":
                    await _push_once(session, store, req, progress, link, rates)
                else:
                    await _pull_once(session.client, store, req, progress, link)
                ok = True
                return
            except RemoteUnavailable as exc:
                attempt += 1
                if attempt > req.max_reconnects:
                    raise TransferFailed(f"peer {req.peer_url} unreachable after {attempt} attempts: {exc}") from exc
                progress.reconnects += 1
                await asyncio.sleep(min(2.0, 0.05 * 2**attempt))
    except BaseException:
        if req.direction == "push" and req.announce_ttl_s is not None:
            await asyncio.shield(handoff_push.withdraw_unsent(req, progress))
        raise
    finally:
        if ok and pooled and peers is not None:
            await peers.give_back(session)
        else:
            await session.close()


async def _peer_namespace(client: AsyncClient, ns: Namespace) -> Namespace:
    """Register the namespace on the peer; its token's tenant must be the namespace's.

    No round trip of its own: the peer refuses to register another tenant's namespace (the
    connection's HELLO told it the token's tenant), and the refusal is reported with both tenants.
    """
    try:
        return await client.register(ns)
    except Forbidden as exc:
        tenant = client.info.tenant if client.info is not None else None
        raise Forbidden(f"the peer's token belongs to tenant {tenant!r}, the namespace to {ns.tenant!r}") from exc


async def _open(session: PeerSession, req: TransferRequest, left: Sequence[ChunkKey],
                progress: TransferProgress) -> tuple[Namespace, tuple[PeerStore, ...]]:
    """REGISTER (unless done on this connection), HAVE and ANNOUNCE, pipelined: one round trip.

    On a new connection they follow its HELLO in the same write. The peer handles a connection's
    frames in order, so the announcement is in place before the first XPUT; it does not expect keys
    it already holds. Records the round trip in ``session.rtt_s``.
    """
    ns, client = req.namespace, session.client
    live = client.live_connection()
    register = live is None or live is not session.conn or ns.id not in session.registered
    parts = [left[i : i + HAVE_BATCH] for i in range(0, len(left), HAVE_BATCH)]
    announce = [] if req.announce_ttl_s is None else [
        left[i : i + handoff_push.BATCH] for i in range(0, len(left), handoff_push.BATCH)]
    requests = [(MsgType.REGISTER, F.register_header(ns, None, ns.chunk_tokens, ns.scheme)[0])] if register else []
    requests += [(MsgType.HAVE, wire.have_header(ns, part)) for part in parts]
    requests += [(MsgType.ANNOUNCE, F.announce_header(ns, part, req.announce_ttl_s)) for part in announce]
    asked = time.monotonic()
    conn, pending = await client.pipeline(requests)
    session.on(conn)
    if register:
        try:
            F.registered(ns, (await conn.wait(pending.pop(0)))[0])
        except Forbidden as exc:
            tenant = conn.info.tenant if conn.info is not None else None
            raise Forbidden(f"the peer's token belongs to tenant {tenant!r}, the namespace to {ns.tenant!r}") from exc
        session.registered.add(ns.id)
    stores: tuple[PeerStore, ...] = ()
    for part, waiting in zip(parts, pending):
        reply = wire.have_reply((await conn.wait(waiting))[0])
        session.rtt_s, stores = min(session.rtt_s, time.monotonic() - asked), reply.stores
        for key, present in zip(part, reply.present):
            if present:
                progress.skipped(key)
            else:
                progress.lost(key)
    for waiting in pending[len(parts) :]:
        try:
            await conn.wait(waiting)
        except KVStoreError as exc:
            if isinstance(exc, ConnectionError):
                raise
            log.warning("the peer refused the announcement of the transfer's chunks: %s", exc)
    return ns, stores


async def _push_once(session: PeerSession, store: TieredStore, req: TransferRequest, progress: TransferProgress,
                     link: LinkEstimator, coders: CoderRates) -> None:
    client = session.client
    # keys acknowledged before are asked again: a peer that restarted may have lost them
    left = [k for k in req.keys if k not in progress.missing]
    ns, stores = await _open(session, req, left, progress)
    todo = [k for k in left if k not in progress.done]
    started = time.monotonic() - progress.elapsed_s
    rtt = session.rtt_s if math.isfinite(session.rtt_s) else 0.0
    clock, inflight = AckClock(link, rtt), set[asyncio.Task[None]]()
    peer = set(o.label for o in req.codec_options if peer_stores(o, stores))  # corrected by XPUT replies
    first: tuple[float, float] | None = None  # when the first chunk was planned, and its projection
    try:
        for n, key in enumerate(todo):
            while len(inflight) >= req.window:
                await _reap(inflight)
            ready_from = time.monotonic()
            raw = await asyncio.to_thread(_read_local, store, ns, key)
            if raw is not None:
                coders.sent(READ_STAGE, False, raw.size, time.monotonic() - ready_from)
            if raw is None:
                progress.absent(key)
                await handoff_push.withdraw(client, ns, [key], req.announce_ttl_s)
                continue
            held = await asyncio.to_thread(_held, store, ns, key, req.codec_options)
            ahead = Ahead(raw.size * (len(todo) - n), len(todo) - n, rtt)
            choice = _plan(req, progress, link, ahead, started, held, frozenset(peer), coders)
            if first is None and choice.projected_s is not None:
                first = (time.monotonic(), choice.projected_s)
            data = await asyncio.to_thread(payload, store, ns, key, raw, choice.option)
            raw_sum = checksum(raw) if choice.option.codec in LOSSLESS else None
            coders.sent(choice.option.label, choice.option.label in held, raw.size, time.monotonic() - ready_from)
            task = asyncio.create_task(_send(client, ns, key, raw.size, data, choice.option, raw_sum, req, progress,
                                             clock, link, peer, coders))  # fmt: skip
            inflight.add(task)
        while inflight:
            await _reap(inflight)
        if first is not None:
            coders.finished(first[1], time.monotonic() - first[0])
    finally:
        for task in inflight:
            task.cancel()
        await asyncio.gather(*inflight, return_exceptions=True)


@dataclass(frozen=True, slots=True)
class Ahead:
    """What is left of a push before one chunk: raw bytes and chunks (this one included), the round trip."""

    bytes_left: int
    chunks_left: int
    rtt_s: float


def _held(store: TieredStore, ns: Namespace, key: ChunkKey, options: Sequence[CodecOption]) -> frozenset[str]:
    """Labels of the options whose container of ``key`` a local tier already holds."""
    return frozenset(o.label for o in options if held_encoded(store, ns, key, o))


def _plan(req: TransferRequest, progress: TransferProgress, link: LinkEstimator, ahead: Ahead, started: float,
          held: frozenset[str] = frozenset(), peer: frozenset[str] = frozenset(),
          coders: CoderRates | None = None) -> Plan:
    """The planner's choice for the next chunk, with the link's latest estimate and the coders' learned speeds.

    ``held``: options whose container of this chunk is held here (no encoding); ``peer``: options
    the peer stores as they arrive (no decoding). The rest of the transfer is projected like this
    chunk, with the fill and drain of the pipeline, the round trip and the window (planner.py).
    """
    options = effective_options(req.codec_options or (CodecOption("raw", "raw"),), coders or CoderRates(), held,
                                peer)  # fmt: skip
    time_left, slip = None, coders.slip if coders is not None else 1.0
    if req.deadline_s is not None:  # projections are stretched by what earlier pushes to this peer showed
        time_left = DEADLINE_MARGIN * (req.deadline_s - (time.monotonic() - started)) / slip
    est = link.estimate.bytes_per_s
    inp = PlanInput(ahead.bytes_left, time_left, est, req.recompute_s, chunks_left=ahead.chunks_left,
                    rtt_s=ahead.rtt_s, window=req.window)  # fmt: skip
    choice = plan(options, inp)
    if coders is not None:
        for o in options:
            if o.label != choice.option.label:
                coders.relax(o.label, o.label in held, o.label in peer)
            else:
                coders.chosen(o.label, o.label in held, o.label in peer)
    progress.estimate_bytes_per_s = est
    progress.projected_s = choice.projected_s
    progress.recompute_cheaper = progress.recompute_cheaper or choice.recompute_cheaper
    return choice


def effective_options(options: Sequence[CodecOption], coders: CoderRates, held: frozenset[str],
                      peer: frozenset[str]) -> list[CodecOption]:
    """The options with the coder speeds this transfer has seen (else the measured ones).

    A chunk held encoded costs the sender no encoding and a container the peer stores as it
    arrives costs it no decoding, until the transfer measures what they do cost (a read, a check);
    an option not timed yet costs the timed read of the raw chunk plus its measured coder.
    """
    out, read = [], coders.send_rate(READ_STAGE, False) or math.inf  # every option reads the raw chunk first
    for o in options:
        h, p = o.label in held, o.label in peer
        enc = coders.send_rate(o.label, h) or _serial(read, math.inf if h else o.encode_bytes_per_s)
        dec = coders.peer_rate(o.label, p) or (math.inf if p else o.decode_bytes_per_s)
        out.append(replace(o, encode_bytes_per_s=enc, decode_bytes_per_s=dec))
    return out


def _serial(a_bytes_per_s: float, b_bytes_per_s: float) -> float:
    """The throughput of two stages one after the other (inf: a stage that costs nothing)."""
    seconds = 1.0 / a_bytes_per_s + 1.0 / b_bytes_per_s
    return math.inf if seconds == 0 else 1.0 / seconds


async def _reap(inflight: set[asyncio.Task[None]]) -> None:
    """Wait for one in-flight send to finish; re-raise its failure."""
    done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        inflight.discard(task)
        task.result()


async def _send(client: AsyncClient, ns: Namespace, key: ChunkKey, raw_size: int, data: bytes, option: CodecOption,
                raw_sum: bytes | None, req: TransferRequest, progress: TransferProgress, clock: AckClock,
                link: LinkEstimator, peer: set[str], coders: CoderRates | None = None) -> None:
    for attempt in range(req.max_resends + 1):
        sent_at = time.monotonic()
        try:
            result = await wire.xput(client, ns, [key], [data], [option.codec], [raw_sum])
        except ChunkCorrupt as exc:
            if attempt == req.max_resends:
                raise TransferFailed(f"chunk {key.hex()} arrived corrupt {attempt + 1} times: {exc}") from exc
            progress.resent += 1
            continue
        clock.acked(len(data), sent_at, busy_s=result.busy_s)
        if coders is not None:
            coders.stored(option.label, option.codec != "raw" and result.encoded[0], raw_size, result.busy_s)
        if result.encoded[0]:  # what the peer did with this codec's containers: the planner's next guess
            peer.add(option.label)
        elif option.codec != "raw":
            peer.discard(option.label)
        progress.estimate_bytes_per_s = link.estimate.bytes_per_s
        if result.stored[0]:
            progress.sent(ChunkSent(key, option.label, raw_size, len(data)))
        else:
            raise TransferFailed(f"the peer had no room for chunk {key.hex()} (everything pinned)")
        return


def _read_local(store: TieredStore, ns: Namespace, key: ChunkKey) -> U8 | None:
    out = np.empty(ns.chunk_nbytes, dtype=np.uint8)
    n = store.get(ns, key, out)
    return None if n is None else out[:n]


async def _pull_once(client: AsyncClient, store: TieredStore, req: TransferRequest, progress: TransferProgress,
                     link: LinkEstimator) -> None:
    ns = await _peer_namespace(client, req.namespace)
    store.register_namespace(req.namespace)
    for key in req.keys:
        if key not in progress.done and await asyncio.to_thread(store.contains, req.namespace, key):
            progress.skipped(key)
    todo = [k for k in req.keys if k not in progress.done and k not in progress.missing]
    clock = AckClock(link)
    for i in range(0, len(todo), req.window):
        part = todo[i : i + req.window]
        outs = [np.empty(ns.chunk_nbytes, dtype=np.uint8) for _ in part]
        sent_at = time.monotonic()
        sizes = await _get_verified(client, ns, part, outs, req, progress)
        clock.acked(sum(s or 0 for s in sizes), sent_at)
        progress.estimate_bytes_per_s = link.estimate.bytes_per_s
        for key, size, out in zip(part, sizes, outs):
            if size is None:
                progress.absent(key)
                continue
            await asyncio.to_thread(store.put, req.namespace, key, out[:size])
            progress.sent(ChunkSent(key, "raw", size, size))


async def _get_verified(client: AsyncClient, ns: Namespace, keys: Sequence[ChunkKey], outs: list[U8],
                        req: TransferRequest, progress: TransferProgress) -> list[int | None]:
    for attempt in range(req.max_resends + 1):
        try:
            return await client.get_many(ns, keys, outs)
        except ChunkCorrupt as exc:
            if attempt == req.max_resends:
                raise TransferFailed(f"chunks arrived corrupt {attempt + 1} times: {exc}") from exc
            progress.resent += 1
    raise AssertionError("unreachable")
