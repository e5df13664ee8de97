"""The data plane's side of a prefill/decode hand-off: ANNOUNCE, and LOOKUPs that wait for announced chunks.

A sender (a prefill engine's connector, or this daemon's peer running a
push) first ANNOUNCEs the keys it is about to store here; a LOOKUP with
``wait_s`` whose hit stops before the query's end, where the next keys are
announced, waits for them (up to ``wait_s``, bounded by the daemon's
``handoff_max_wait_s``) and looks up again. Whatever arrived is then served
by the ordinary lookup, so a wait never hands out anything a lookup would
not. A wait that runs out returns the shorter hit, never an error.

Announcements live in the daemon's one :class:`~kvstore.service.migration.inflight.Inflight`
(fed by the store's events) and are per namespace: a connection may announce,
withdraw and wait only in namespaces its tenant may use.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from kvstore.errors import Busy, InvalidInput
from kvstore.keys import ChunkKey, Namespace
from kvstore.service.dataplane_core import Reply, Result
from kvstore.service.migration.inflight import Inflight
from kvstore.service.protocol import ServerBusy, field_bool, field_float, field_keys
from kvstore.tiers.store_types import LookupResult

if TYPE_CHECKING:
    from kvstore.service.dataplane_handlers import Ctx

T = TypeVar("T")

MAX_ANNOUNCE_KEYS = 16384  # keys per ANNOUNCE (4M tokens at 256 per chunk)
BUSY_RETRY_S = 1.0


def registry(ctx: Ctx) -> Inflight:
    """The daemon's registry of announced chunks.

    Raises:
        InvalidInput: this data plane was started without one (not by a daemon).
    """
    found = ctx.core.inflight
    if found is None:
        raise InvalidInput("this data plane keeps no announcements (started without an in-flight registry)")
    return found


def announce(ctx: Ctx, h: dict[str, Any], payload: bytes | None) -> Result:
    """ANNOUNCE: expect ``keys`` of ``ns`` within ``ttl_s`` (or, with ``withdraw``, stop expecting them).

    Keys this namespace already holds are not expected (a lookup would not wait for them).

    Raises:
        InvalidInput: a bad ttl, too many keys, a malformed header; UnknownNamespace: not the tenant's.
        ServerBusy: the daemon holds as many announced keys as it may (nothing was announced).
    """
    ns, reg = ctx.namespace(h), registry(ctx)
    keys = [ChunkKey(k) for k in field_keys(h, max_items=MAX_ANNOUNCE_KEYS)]
    if field_bool(h, "withdraw", False):
        return Reply({"withdrawn": reg.withdraw(ns.id, keys)})
    ttl = field_float(h, "ttl_s")
    if ttl is None:
        raise InvalidInput("field 'ttl_s' is required: an announcement expires by itself")
    try:
        reg.announce(ns.id, keys, ttl)
    except Busy as exc:
        raise ServerBusy(str(exc), BUSY_RETRY_S) from None
    access = ctx.core.access

    def settle() -> Reply:  # announced first, checked second: a chunk stored in between is not awaited
        held = [k for k in keys if access.owned(ns, k) and access.store.contains(ns, k)]
        reg.arrived(ns.id, held)
        return Reply({"announced": len(set(keys)) - len(set(held))})

    return ctx.core.offload(settle) if access.layered else settle()


async def wait_for_announced(ctx: Ctx, ns: Namespace, local: Callable[[], LookupResult],
                             asked: Callable[[], list[ChunkKey]], first: LookupResult,
                             wait_s: float) -> LookupResult:
    """Look up again while the keys after the hit are announced and arriving, until ``wait_s`` ends.

    ``first`` is the lookup done so far; its lease is given back before each
    new lookup. Returns the last lookup (the longest hit seen).
    """
    reg = ctx.core.inflight
    if reg is None or wait_s <= 0:
        return first
    deadline = time.monotonic() + min(wait_s, reg.limits.max_wait_s)
    r, keys = first, None
    while r.hit_chunks < r.query_chunks:
        keys = keys if keys is not None else await _maybe_offload(ctx, asked)
        rest = keys[r.hit_chunks :]
        left = deadline - time.monotonic()
        if left <= 0 or reg.pending(ns.id, rest) == 0:
            break
        await reg.wait(ns.id, rest, left)
        if r.lease is not None:
            ctx.core.access.store.release(r.lease)
        r = await _maybe_offload(ctx, local)
    return r


def _maybe_offload(ctx: Ctx, fn: Callable[[], T]) -> Awaitable[T]:
    if ctx.core.access.remote or ctx.core.access.layered:
        return ctx.core.offload(fn)
    return _ready(fn())


async def _ready(value: T) -> T:
    return value
