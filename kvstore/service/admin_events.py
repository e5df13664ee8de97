"""``GET /v1/events``: the store's KV events streamed to a subscriber, in vLLM's format.

Each subscriber gets its own bounded queue on the store's event fanout and a
:class:`~kvstore.connectors.vllm_events.VLLMEventStream` over it, so a router
learns where prefixes live: ``BlockStored`` when a tier holds a chunk (the
chunk's key as the block hash, the tier as the medium), ``BlockRemoved`` when
it no longer does, ``AllBlocksCleared`` when a namespace is cleared. A tenant
token sees the events of its own namespaces only; an admin sees all.

Wire formats (``?format=``):

- ``msgpack`` (default, ``application/vnd.kvstore.vllm-events``): a sequence of
  frames, each ``u32 big-endian length | u64 big-endian seq | payload``, where
  payload is the msgpack batch vLLM's ZMQ publisher sends (``[ts, events]``);
  seq is the batch number of this stream, from 0.
- ``json`` (``application/x-ndjson``): one line per batch,
  ``{"seq", "ts", "events": [...]}`` with block hashes as hex strings.

The stream ends when the client goes away, when ``seconds`` (if given) have
passed, or when the daemon starts draining. A slow subscriber loses the
oldest events of its queue (at most 65,536 are kept; the ``dropped`` field of
each JSON line counts them), never the daemon's memory; at most 64
subscribers at once (503 beyond).
"""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from kvstore.connectors.vllm_events import EventFanout, VLLMEventStream, decode_batch, event_to_wire
from kvstore.errors import UnknownNamespace
from kvstore.keys import NamespaceId
from kvstore.service import admin_scope as scope
from kvstore.service.admin_io import ApiError
from kvstore.service.admin_state import EVENTS, STATE, STORE
from kvstore.tiers.store import TieredStore

routes = web.RouteTableDef()

MAX_SUBSCRIBERS = 64
QUEUE_EVENTS = 65536
FORMATS = {"msgpack": "application/vnd.kvstore.vllm-events", "json": "application/x-ndjson"}


class _TenantNamespaces:
    """The namespace ids one tenant owns, asked of the store at each event (namespaces come and go)."""

    def __init__(self, store: TieredStore, tenant: str) -> None:
        self._store, self._tenant = store, tenant

    def __contains__(self, ns_id: object) -> bool:
        try:
            return self._store.namespace(ns_id).tenant == self._tenant  # type: ignore[arg-type]
        except UnknownNamespace:
            return False

    def __len__(self) -> int:
        return sum(ns.tenant == self._tenant for ns in self._store.namespaces())

    def __iter__(self):  # type: ignore[no-untyped-def]
        return (ns.id for ns in self._store.namespaces() if ns.tenant == self._tenant)


def _query_float(request: web.Request, name: str, default: float | None, lo: float, hi: float) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {name!r} must be a number") from None
    if not lo <= value <= hi:
        raise ApiError(400, f"query parameter {name!r} must be in [{lo}, {hi}]")
    return value


@routes.get("/v1/events")
async def events(request: web.Request) -> web.StreamResponse:
    """Stream the store's KV events (vLLM format) until the client leaves or ``seconds`` pass."""
    fmt = request.query.get("format", "msgpack")
    if fmt not in FORMATS:
        raise ApiError(400, f"format must be one of {sorted(FORMATS)}")
    interval = _query_float(request, "interval_s", 0.1, 0.01, 10.0) or 0.1
    seconds = _query_float(request, "seconds", None, 0.0, 86400.0)
    fanout: EventFanout = request.app[EVENTS]
    state = request.app[STATE]
    if state.event_subscribers >= MAX_SUBSCRIBERS:
        raise ApiError(503, f"at most {MAX_SUBSCRIBERS} event subscribers; try again later")
    store = request.app[STORE]
    who = scope.caller(request)
    namespaces = None if who.is_admin else _TenantNamespaces(store, who.tenant)

    def chunk_tokens(ns_id: NamespaceId) -> int | None:
        try:
            return store.namespace(ns_id).chunk_tokens
        except UnknownNamespace:
            return None

    queue = fanout.subscribe(QUEUE_EVENTS)
    state.event_subscribers += 1
    stream = VLLMEventStream(queue, chunk_tokens, namespaces)
    response = web.StreamResponse(headers={"Content-Type": FORMATS[fmt], "Cache-Control": "no-store"})
    try:
        await response.prepare(request)
        deadline = None if seconds is None else time.monotonic() + seconds
        while not state.draining and (deadline is None or time.monotonic() < deadline):
            batch = await asyncio.to_thread(stream.poll)
            if batch is not None:
                if fmt == "msgpack":
                    await response.write(
                        len(batch.payload).to_bytes(4, "big") + batch.seq.to_bytes(8, "big") + batch.payload
                    )
                else:
                    ts, evs, _ = decode_batch(batch.payload)
                    line = {
                        "seq": batch.seq, "ts": ts, "dropped": queue.dropped,
                        "events": [_hexed(event_to_wire(e)) for e in evs],
                    }  # fmt: skip
                    await response.write(json.dumps(line).encode() + b"\n")
            await asyncio.sleep(interval)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the subscriber went away
    finally:
        fanout.unsubscribe(queue)
        state.event_subscribers -= 1
    return response


def _hexed(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _hexed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_hexed(v) for v in value]
    return value
