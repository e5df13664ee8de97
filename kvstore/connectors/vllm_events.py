"""kvstore's store events as vLLM KV events (``BlockStored``, ``BlockRemoved``, ``AllBlocksCleared``).

The records have the field names, order and defaults of the pinned release's
msgspec structs (vLLM 0.33.0, ``vllm/distributed/kv_events.py``), and
:func:`encode_batch` writes vLLM's wire shape with msgpack alone, byte for
byte what vLLM's msgspec encoder writes (checked against the real package by
tests/connectors/test_vllm_engine.py): a batch is an array ``[ts, events,
data_parallel_rank]`` (the rank nil when not given: an array-like struct
keeps its trailing defaults); each event is a map whose first entry is the
tag ``"type": <class name>``, then every required field, then the optional
fields that are not None (msgspec's ``tag=True, omit_defaults=True``). A ZMQ subscriber of vLLM's
publisher receives ``(topic, seq as 8 bytes big-endian, payload)``, which
:meth:`VLLMEventStream.poll` also returns.

What is advertised: the chunk's kvstore key (32 bytes, docs/keys.md) as the
block hash, the namespace's ``chunk_tokens`` as ``block_size``, and the tier
name as ``medium``. A ``BlockStored`` is emitted only once the tier holds the
chunk under that key (the store emits it after the copy), and a chunk that
was stored and dropped again within one drained batch is not announced at
all, so no event names a chunk that cannot be fetched under its key. Clearing
a namespace becomes ``AllBlocksCleared``: the store does not list the keys it
cleared, so the stream says that nothing is known to be held (a router then
under-, never over-estimates).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgpack

from kvstore.events import EventQueue, EventSink, StoreEvent
from kvstore.keys import NamespaceId

ExternalBlockHash: TypeAlias = bytes | int


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks a medium now holds (vLLM's fields, in vLLM's order)."""

    block_hashes: tuple[ExternalBlockHash, ...]
    parent_block_hash: ExternalBlockHash | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: tuple[tuple[Any, ...] | None, ...] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: tuple[tuple[int, ...], ...] | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks a medium no longer holds."""

    block_hashes: tuple[ExternalBlockHash, ...]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """Nothing the publisher announced before is known to be held any more."""


VLLMEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared
ChunkTokensOf = Callable[[NamespaceId], "int | None"]


def convert(
    events: Iterable[StoreEvent],
    chunk_tokens: ChunkTokensOf,
    namespaces: Collection[NamespaceId] | None = None,
) -> list[VLLMEvent]:
    """vLLM events for store events, in order.

    Args:
        events: drained store events, oldest first.
        chunk_tokens: the ``chunk_tokens`` of a namespace id (None: unknown, its events are skipped).
        namespaces: only events of these namespaces (a tenant's stream); None for all.

    Returns:
        One ``BlockStored`` per stored chunk and tier, one ``BlockRemoved`` per
        run of removals from one tier, one ``AllBlocksCleared`` per run of clears;
        a store cancelled by a removal in the same batch yields neither.
    """
    out: list[VLLMEvent | None] = []
    pending: dict[tuple[bytes, str], int] = {}  # (key, tier) -> index of its BlockStored in out
    for ev in events:
        if namespaces is not None and ev.namespace not in namespaces:
            continue
        if ev.kind == "cleared":
            pending.clear()
            if not (out and isinstance(out[-1], AllBlocksCleared)):
                out.append(AllBlocksCleared())
            continue
        if ev.key is None or ev.namespace is None:
            continue
        where = (bytes(ev.key), ev.tier)
        if ev.kind == "stored":
            size = chunk_tokens(ev.namespace)
            if size is not None and where not in pending:
                pending[where] = len(out)
                out.append(BlockStored((bytes(ev.key),), None, (), size, None, ev.tier, None))
            continue
        index = pending.pop(where, None)
        if index is not None:
            out[index] = None  # stored and dropped within the batch: announce neither
            continue
        last = out[-1] if out else None
        if isinstance(last, BlockRemoved) and last.medium == ev.tier:
            out[-1] = dataclasses.replace(last, block_hashes=(*last.block_hashes, bytes(ev.key)))
        else:
            out.append(BlockRemoved((bytes(ev.key),), ev.tier))
    return [e for e in out if e is not None]


def event_to_wire(event: VLLMEvent) -> dict[str, Any]:
    """One event as vLLM encodes it: tag first, required fields, then optional fields that are set."""
    wire: dict[str, Any] = {"type": type(event).__name__}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        required = f.default is dataclasses.MISSING
        if required or value is not None:
            wire[f.name] = _plain(value)
    return wire


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def encode_batch(events: Iterable[VLLMEvent], ts: float, data_parallel_rank: int | None = None) -> bytes:
    """A ``KVEventBatch`` in vLLM's msgpack wire shape, byte for byte as msgspec writes it."""
    parts = [_pack(float(ts))]
    encoded = [encode_event(e) for e in events]
    parts.append(_array_header(len(encoded)))
    parts.extend(encoded)
    parts.append(_pack(None if data_parallel_rank is None else int(data_parallel_rank)))
    return _array_header(3) + b"".join(parts)


def encode_event(event: VLLMEvent) -> bytes:
    """One event as msgspec writes a tagged struct.

    msgspec sizes a struct's map header for every field it could write (the
    tag and all fields), then writes the set ones: structs with more than 15
    possible entries (``BlockStored``) get a 16-bit map header even when fewer
    are written.
    """
    wire = event_to_wire(event)
    possible = 1 + len(dataclasses.fields(event))
    n = len(wire)
    header = bytes([0x80 | n]) if possible <= 15 else b"\xde" + n.to_bytes(2, "big")
    return header + b"".join(_pack(k) + _pack(v) for k, v in wire.items())


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def decode_batch(payload: bytes) -> tuple[float, list[VLLMEvent], int | None]:
    """Read back a batch written by :func:`encode_batch` (or by vLLM's publisher).

    Raises:
        ValueError: not a KV event batch.
    """
    body = msgpack.unpackb(payload, raw=False)
    if not isinstance(body, list) or len(body) not in (2, 3) or not isinstance(body[1], list):
        raise ValueError("not a KV event batch: expected [ts, events(, dp_rank)]")
    kinds: dict[str, type[VLLMEvent]] = {c.__name__: c for c in (BlockStored, BlockRemoved, AllBlocksCleared)}
    events: list[VLLMEvent] = []
    for wire in body[1]:
        cls = kinds.get(str(wire.get("type"))) if isinstance(wire, dict) else None
        if cls is None:
            raise ValueError(f"unknown KV event {wire!r}")
        fields = {k: _tuples(v) for k, v in wire.items() if k != "type"}
        events.append(cls(**fields))
    return float(body[0]), events, body[2] if len(body) == 3 else None


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def to_vllm_structs(events: Iterable[VLLMEvent]) -> list[Any]:
    """The same events as vLLM's own msgspec structs (needs vLLM installed).

    vLLM's scheduler feeds a connector's ``take_events`` into its own publisher,
    which encodes them with msgspec, so the connector hands it these.

    Raises:
        ImportError: vLLM is not installed.
    """
    from vllm.distributed import kv_events as kv

    out = []
    for event in events:
        cls = getattr(kv, type(event).__name__)
        out.append(cls(**{k: v for k, v in event_to_wire(event).items() if k != "type"}))
    return out


@dataclass(frozen=True, slots=True)
class EventFrames:
    """One published batch: the frames of vLLM's ZMQ publisher, and the events in it."""

    seq: int
    topic: bytes
    payload: bytes
    events: tuple[VLLMEvent, ...]

    @property
    def frames(self) -> tuple[bytes, bytes, bytes]:
        """``(topic, seq as 8 bytes big-endian, payload)``, as vLLM's publisher sends them."""
        return self.topic, self.seq.to_bytes(8, "big"), self.payload


class VLLMEventStream:
    """A store's events (through its own :class:`EventQueue`) as numbered vLLM event batches.

    Invariant: ``seq`` increases by one per batch returned; an empty poll
    returns None and uses no number.
    """

    def __init__(
        self,
        queue: EventQueue,
        chunk_tokens: ChunkTokensOf,
        namespaces: Collection[NamespaceId] | None = None,
        topic: str = "",
        data_parallel_rank: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.chunk_tokens = chunk_tokens
        self.namespaces = namespaces
        self.topic = topic.encode("utf-8")
        self.data_parallel_rank = data_parallel_rank
        self._clock = clock
        self._seq = -1
        self._lock = threading.Lock()

    def poll(self) -> EventFrames | None:
        """Drain the queue into one batch; None if it yields no event."""
        with self._lock:
            events = convert(self.queue.drain(), self.chunk_tokens, self.namespaces)
            if not events:
                return None
            self._seq += 1
            payload = encode_batch(events, self._clock(), self.data_parallel_rank)
            return EventFrames(self._seq, self.topic, payload, tuple(events))


class EventFanout:
    """An event sink that copies each store event into every subscribed queue.

    A store takes one sink; a daemon that streams to several subscribers
    (one per tenant or connection) gives it a fanout and a queue to each.
    """

    def __init__(self) -> None:
        self._queues: list[EventQueue] = []
        self._sinks: list[EventSink] = []
        self._lock = threading.Lock()

    def subscribe(self, maxlen: int = 65536) -> EventQueue:
        queue = EventQueue(maxlen)
        with self._lock:
            self._queues = [*self._queues, queue]
        return queue

    def unsubscribe(self, queue: EventQueue) -> None:
        with self._lock:
            self._queues = [q for q in self._queues if q is not queue]

    def attach(self, sink: EventSink) -> None:
        """Also copy every event into ``sink`` (a consumer that reacts at once, not a queue)."""
        with self._lock:
            self._sinks = [*self._sinks, sink]

    def detach(self, sink: EventSink) -> None:
        with self._lock:
            self._sinks = [s for s in self._sinks if s is not sink]

    def emit(self, event: StoreEvent) -> None:
        for queue in self._queues:
            queue.emit(event)
        for sink in self._sinks:
            sink.emit(event)
