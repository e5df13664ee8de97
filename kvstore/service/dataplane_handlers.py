"""Request handlers of the data plane: one function per message type (puts: dataplane_put.py).

A handler takes the connection's :class:`Ctx`, the decoded header and the
payload (bytes, or None) and returns a :class:`Reply` - or an awaitable of
one when it must read a lower tier on a worker thread. Handlers validate
every field with the typed readers of ``protocol`` and raise typed errors;
the connection turns those into ERROR / BUSY replies. Every key-based request
is namespace-checked (``StoreAccess``): another tenant's chunk is a miss.
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore.errors import InvalidInput, LeaseError
from kvstore.keys import ChunkKey, Namespace, iter_prefix_keys
from kvstore.service.dataplane_core import Reply, Result, ServerCore
from kvstore.service.dataplane_session import Budget, Session
from kvstore.service.migration import handoff
from kvstore.service.protocol import (
    VERSION,
    Forbidden,
    MsgType,
    ServerBusy,
    Unauthorized,
    field_bool,
    field_bytes,
    field_float,
    field_int,
    field_ints,
    field_keys,
    field_opt_int,
    namespace_from_wire,
)
from kvstore.tiers.leases import LeaseId
from kvstore.tiers.store_types import LookupResult


@dataclass(slots=True)
class Ctx:
    """What a handler may use: the server's shared state and this connection's."""

    core: ServerCore
    session: Session
    budget: Budget
    unix: bool
    peer_uid: int | None

    @property
    def tenant(self) -> str | None:
        return self.session.tenant

    def namespace(self, h: dict[str, Any]) -> Namespace:
        return self.core.access.namespace(field_bytes(h, "ns", 32), self.session.tenant)

    def lease(self, h: dict[str, Any]) -> LeaseId | None:
        """The request's lease; None if it names none, or one that expired or was released (the
        request then reads without it, like the in-process store: a chunk evicted meanwhile is a
        miss). Another tenant's live lease is refused."""
        lease = field_opt_int(h, "lease", 1)
        if lease is not None and not self.core.leases.check(lease, self.session.tenant):
            return None
        return lease


Handler = Callable[[Ctx, dict[str, Any], bytes | None], Result]


def hello(ctx: Ctx, h: dict[str, Any], payload: bytes | None) -> Result:
    tokens = ctx.core.config.tokens
    tenant: str | None = None
    if tokens:
        token = h.get("token")
        if not isinstance(token, str) or not token:
            raise Unauthorized("this daemon requires a bearer token in HELLO")
        tenant = _tenant_of(tokens, token)
        if tenant is None:
            raise Unauthorized("unknown bearer token")
        if ctx.session.authenticated and ctx.session.tenant != tenant:
            raise Forbidden("this connection is bound to another tenant")
    ctx.session.tenant, ctx.session.authenticated = tenant, True
    shm = (
        ctx.core.shm_info()
        if field_bool(h, "shm", True) and ctx.unix and ctx.peer_uid == ctx.core.uid
        else None
    )
    ctx.session.shm_offered = shm is not None
    cfg = ctx.core.config
    return Reply(
        {
            "tenant": tenant,
            "version": VERSION,
            "max_payload_bytes": cfg.max_payload_bytes,
            "max_inflight_bytes": cfg.max_inflight_bytes,
            "shm": shm,
        },
        type=MsgType.HELLO_OK,
    )


def _tenant_of(tokens: Any, token: str) -> str | None:
    """The tenant of ``token``, compared in constant time against every configured token."""
    found: str | None = None
    for known, tenant in tokens.items():
        if hmac.compare_digest(known.encode(), token.encode()):
            found = tenant
    return found


def register(ctx: Ctx, h: dict[str, Any], payload: bytes | None) -> Result:
    spec = h.get("spec")
    asked = spec.get("tenant") if isinstance(spec, dict) else None
    tenant = ctx.tenant
    if tenant is not None and asked is not None and asked != tenant:
        raise Forbidden("this connection may register namespaces of its own tenant only")
    if tenant is None:
        if not isinstance(asked, str) or not asked:
            raise InvalidInput("field 'spec' needs a non-empty 'tenant' on a daemon without tokens")
        tenant = asked
    ns = namespace_from_wire(spec, tenant)
    ctx.core.access.store.register_namespace(ns)
    return Reply({"namespace": ns.id, "chunk_bytes": ns.chunk_nbytes})


def lookup(ctx: Ctx, h: dict[str, Any], payload: bytes | None) -> Result:
    ns = ctx.namespace(h)
    lease, ttl = field_bool(h, "lease", True), field_float(h, "ttl_s")
    if ttl is not None and ttl <= 0:
        raise InvalidInput("field 'ttl_s' must be > 0")
    store = ctx.core.access.store
    if payload is not None:
        if len(payload) % 4:
            raise InvalidInput("a LOOKUP payload holds u32 little-endian token ids")
        tokens = np.frombuffer(payload, dtype="<u4")

        def local() -> LookupResult:
            return store.lookup(ns, tokens, lease, ttl)

        def asked() -> list[ChunkKey]:
            return list(iter_prefix_keys(ns, tokens))
    else:
        keys = [ChunkKey(k) for k in field_keys(h)]

        def local() -> LookupResult:
            return store.lookup_keys(ns, keys, lease, ttl)

        def asked() -> list[ChunkKey]:
            return keys

    wait_s = field_float(h, "wait_s") or 0.0
    if ctx.core.peers is not None or (wait_s > 0 and ctx.core.inflight is not None):
        return _lookup_further(ctx, ns, local, asked, ttl, wait_s)

    def run() -> Reply:
        return _lookup_reply(ctx, ns, local(), ttl)

    return ctx.core.offload(run) if ctx.core.access.remote else run()


async def _lookup_further(ctx: Ctx, ns: Namespace, local: Callable[[], LookupResult],
                          asked: Callable[[], list[ChunkKey]], ttl: float | None, wait_s: float) -> Reply:
    """A LOOKUP whose local miss asks peers (kvstore.service.migration.peers): chunks they hold
    after the local hit are pulled and stored here, and the lookup runs again over them; then,
    with ``wait_s``, waits for announced chunks after the hit (kvstore.service.migration.handoff)."""
    peers, offload = ctx.core.peers, ctx.core.offload
    r = await offload(local)
    if peers is not None and r.hit_chunks < r.query_chunks:
        keys = await offload(asked)
        if (await peers.pull(ns, keys[r.hit_chunks :])).pulled:
            if r.lease is not None:
                ctx.core.access.store.release(r.lease)
            r = await offload(local)
    r = await handoff.wait_for_announced(ctx, ns, local, asked, r, wait_s)
    return _lookup_reply(ctx, ns, r, ttl)


def _lookup_reply(ctx: Ctx, ns: Namespace, r: LookupResult, ttl: float | None) -> Reply:
    """The LOOKUP answer, cut at the first hit of another namespace (its pins given back)."""
    access = ctx.core.access
    keep = access.owned_prefix(ns, r.keys)
    lease: LeaseId | None = r.lease
    if lease is not None:
        for key in r.keys[keep:]:
            access.store.leases.consume(lease, key)
        if keep == 0:
            access.store.release(lease)
            lease = None
        else:
            ctx.core.leases.add(lease, ctx.tenant, ttl or access.store.leases.default_ttl_s)
    return Reply(
        {
            "hit_tokens": keep * ns.chunk_tokens,
            "keys": list(r.keys[:keep]),
            "tiers": list(r.tiers[:keep]),
            "query_chunks": r.query_chunks,
            "lease": lease,
        }
    )


def get(ctx: Ctx, h: dict[str, Any], payload: bytes | None) -> Result:
    ns, keys, lease = ctx.namespace(h), [ChunkKey(k) for k in field_keys(h)], ctx.lease(h)
    capacity = field_ints(h, "capacity", len(keys)) if h.get("capacity") is not None else None
    access = ctx.core.access
    pinned: list[ChunkKey] = []
    views: list[memoryview | None] = []
    if access.arena is None:  # a top tier without a host arena (GPU): copies through the store
        return _get_lower(ctx, ns, keys, [None] * len(keys), pinned, lease, capacity)
    for key in keys:
        extent = access.locate(ns, key)
        if extent is not None:
            pinned.append(key)
            if lease is not None:
                access.store.leases.consume(lease, key)
        views.append(None if extent is None else access.view(extent).data)
    if access.layered and any(v is None for v in views):
        return _get_lower(ctx, ns, keys, views, pinned, lease, capacity)
    return _get_reply(ctx, keys, views, pinned, capacity)


async def _get_lower(ctx: Ctx, ns: Namespace, keys: list[ChunkKey], views: list[memoryview | None],
                     pinned: list[ChunkKey], lease: LeaseId | None, capacity: list[int] | None) -> Reply:
    """Fill the top-tier misses of a GET through the store (worker threads read the lower tiers).

    The in-flight budget is taken for every chunk before any is read, so a
    large GET from a lower tier is refused (BUSY) before it allocates.
    """
    access, taken = ctx.core.access, 0
    try:
        missing = [i for i, v in enumerate(views) if v is None]
        sizes = await ctx.core.offload(lambda: [access.lower_size(ns, keys[i]) for i in missing])
        taken = sum(v.nbytes for v in views if v is not None) + sum(n or 0 for n in sizes)
        ctx.budget.take(taken)
        found = await ctx.core.offload(
            lambda: [access.read_lower(ns, keys[i], lease) if n else None for i, n in zip(missing, sizes)])
    except BaseException:
        ctx.budget.give(taken)
        _unpin(ctx, pinned)
        raise
    for i, data in zip(missing, found):
        views[i] = None if data is None else data.data
    ctx.budget.give(taken)  # _get_reply takes what the reply really holds
    return _get_reply(ctx, keys, views, pinned, capacity)


def _get_reply(ctx: Ctx, keys: list[ChunkKey], views: list[memoryview | None], pinned: list[ChunkKey],
               capacity: list[int] | None) -> Reply:
    try:
        sizes = [-1 if v is None else v.nbytes for v in views]
        if capacity is not None:
            for i, (size, cap) in enumerate(zip(sizes, capacity)):
                if size > cap:
                    raise InvalidInput(f"output buffer {i} holds {cap} bytes; the chunk has {size}")
        total = sum(max(s, 0) for s in sizes)
        ctx.budget.take(total)
    except BaseException:
        _unpin(ctx, pinned)
        raise
    checksums = [ctx.core.access.checksum_of(k) if v is not None else b"" for k, v in zip(keys, views)]
    return Reply({"sizes": sizes, "checksums": checksums}, [v for v in views if v is not None],
                 on_sent=lambda ok: _unpin(ctx, pinned), inflight=total)


def _unpin(ctx: Ctx, keys: list[ChunkKey]) -> None:
    while keys:
        ctx.core.access.unpin(keys.pop())


def delete(ctx: Ctx, h: dict[str, Any], payload: bytes | None) -> Result:
    ns, keys, access = ctx.namespace(h), [ChunkKey(k) for k in field_keys(h)], ctx.core.access

    def run() -> Reply:
        return Reply({"deleted": sum(access.delete(ns, k) for k in keys)})

    return ctx.core.offload(run) if access.layered else run()


def prefetch(ctx: Ctx, h: dict[str, Any], payload: bytes | None) -> Result:
    ns, keys, access = ctx.namespace(h), [ChunkKey(k) for k in field_keys(h)], ctx.core.access
    in_top = [meta is not None and meta.namespace == ns.id for meta in map(access.top.meta, keys)]
    if not access.layered or all(in_top):
        return Reply({"promoted": 0, "present": sum(in_top)})

    def run() -> Reply:
        promoted = sum(access.read_lower(ns, k, None) is not None for k, top in zip(keys, in_top) if not top)
        return Reply({"promoted": promoted, "present": sum(in_top) + promoted})

    return ctx.core.offload(run)


def release(ctx: Ctx, h: dict[str, Any], payload: bytes | None) -> Result:
    lease = field_int(h, "lease", 1)
    try:
        if not ctx.core.leases.check(lease, ctx.tenant):
            return Reply({"released": False})
    except LeaseError:
        return Reply({"released": False})
    ctx.core.leases.discard(lease)
    return Reply({"released": ctx.core.access.store.release(lease)})


def shm_get(ctx: Ctx, h: dict[str, Any], payload: bytes | None) -> Result:
    if not ctx.session.shm_offered:
        raise Forbidden("shared memory is not offered on this connection (Unix socket, same uid, HELLO shm)")
    ns, keys, lease = ctx.namespace(h), [ChunkKey(k) for k in field_keys(h)], ctx.lease(h)
    session = ctx.session
    if session.pinned + len(keys) > session.max_pins:
        raise ServerBusy(f"this connection holds {session.pinned} pins; release some first", 0.01)
    access = ctx.core.access
    if access.layered:
        absent = [k for k in keys if access.top.meta(k) is None]
        if absent:
            return _shm_get_promoting(ctx, ns, keys, lease, absent)
    return _shm_pin(ctx, ns, keys, lease)


async def _shm_get_promoting(
    ctx: Ctx, ns: Namespace, keys: list[ChunkKey], lease: LeaseId | None, absent: list[ChunkKey]
) -> Reply:
    access = ctx.core.access
    await ctx.core.offload(lambda: [access.read_lower(ns, k, None) for k in absent])
    return _shm_pin(ctx, ns, keys, lease)


def _shm_pin(ctx: Ctx, ns: Namespace, keys: list[ChunkKey], lease: LeaseId | None) -> Reply:
    access = ctx.core.access
    offsets, sizes, pinned = [], [], []
    for key in keys:
        extent = access.locate(ns, key)
        if extent is None:
            offsets.append(-1)
            sizes.append(-1)
            continue
        pinned.append(key)
        offsets.append(extent.offset)
        sizes.append(extent.size)
        if lease is not None:
            access.store.leases.consume(lease, key)
    pin = ctx.session.hold_pins(pinned) if pinned else None
    checksums = [access.checksum_of(k) if s >= 0 else b"" for k, s in zip(keys, sizes)]
    return Reply({"offsets": offsets, "sizes": sizes, "pin": pin, "checksums": checksums})


def shm_release(ctx: Ctx, h: dict[str, Any], payload: bytes | None) -> Result:
    pins = field_ints(h, "pins")
    return Reply({"released": sum(ctx.session.release_pins(p) for p in pins)})


def stats(ctx: Ctx, h: dict[str, Any], payload: bytes | None) -> Result:
    wire: dict[str, Any] = {"server": ctx.core.stats.snapshot().to_wire(), "leases": len(ctx.core.leases)}
    if not ctx.core.config.tokens:  # store-wide figures only where there are no tenants to keep apart
        s = ctx.core.access.store.stats()
        top = s.tiers[0]
        wire["store"] = {
            "top_used_bytes": top.used_bytes, "top_capacity_bytes": top.capacity_bytes, "top_entries": top.entries,
            "top_pinned": ctx.core.access.top.pinned_count(), "lease_pinned_chunks": s.leases.pinned_chunks,
            "leases_active": s.leases.active, "gets": s.gets, "get_hits": s.get_hits, "lookups": s.lookups,
            "namespaces": s.namespaces, "index_entries": s.index_entries,
        }  # fmt: skip
        if ctx.core.peers is not None:
            wire["peers"] = ctx.core.peers.stats().to_wire()
        if ctx.core.inflight is not None:
            wire["inflight"] = dataclasses.asdict(ctx.core.inflight.stats())
    return Reply(wire)


def ping(ctx: Ctx, h: dict[str, Any], payload: bytes | None) -> Result:
    return Reply({})


def list_keys(ctx: Ctx, h: dict[str, Any], payload: bytes | None) -> Result:
    ns, limit, access = ctx.namespace(h), field_int(h, "limit", 1, 1 << 16, default=10000), ctx.core.access

    def run() -> Reply:
        keys, truncated = access.list_keys(ns, limit)
        return Reply({"keys": keys, "truncated": truncated})

    return ctx.core.offload(run) if access.layered else run()


def clear(ctx: Ctx, h: dict[str, Any], payload: bytes | None) -> Result:
    ns, store = ctx.namespace(h), ctx.core.access.store

    def run() -> Reply:
        return Reply({"removed": store.clear(ns)})

    return ctx.core.offload(run) if ctx.core.access.layered else run()


HANDLERS: dict[MsgType, Handler] = {
    MsgType.HELLO: hello, MsgType.REGISTER: register, MsgType.LOOKUP: lookup, MsgType.GET: get,
    MsgType.DELETE: delete, MsgType.PREFETCH: prefetch, MsgType.RELEASE: release, MsgType.SHM_GET: shm_get,
    MsgType.SHM_RELEASE: shm_release, MsgType.STATS: stats, MsgType.PING: ping, MsgType.LIST: list_keys,
    MsgType.CLEAR: clear, MsgType.ANNOUNCE: handoff.announce,
}  # fmt: skip
