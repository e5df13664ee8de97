"""Read-side admin endpoints: probes, metrics, stats, config, namespaces, leases, lookup.

Store calls may block (disk, Redis), so handlers run them in a worker
thread. Everything a tenant sees goes through admin_scope.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict

from aiohttp import web

from kvstore.keys import ChunkKey, Namespace
from kvstore.service import admin_scope as scope
from kvstore.service.admin_io import (
    ApiError,
    field_bool,
    field_keys,
    field_str,
    field_tokens,
    opt_ttl,
    read_json,
)
from kvstore.service.admin_metrics import Snapshot
from kvstore.service.admin_state import CONFIG, HISTORY, METRICS, STATE, STORE, snapshot
from kvstore.service.migration import transfer_routes
from kvstore.tiers.store import TieredStore

routes = web.RouteTableDef()
transfer_routes.add_routes(routes)


def require_admin(request: web.Request) -> None:
    if not scope.caller(request).is_admin:
        raise ApiError(403, "process-wide statistics need an admin token (tenant '*')")


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """The process is up and its event loop answers."""
    return web.json_response({"ok": True, "uptime_s": round(time.time() - request.app[STATE].started_at, 3)})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Store open, data plane listening, every tier reachable; 503 otherwise."""
    state = request.app[STATE]
    tiers: dict[str, bool] = {}
    if state.store_open:
        store = request.app[STORE]
        ups = await asyncio.to_thread(lambda: [bool(getattr(t, "available", True)) for t in store.tiers])
        tiers = {t.name: up for t, up in zip(store.tiers, ups)}
    dp: bool | str = "disabled"
    if request.app[CONFIG].data_plane.enabled:
        dp = state.data_plane is not None and state.data_plane.port is not None
    checks = {"store": state.store_open, "data_plane": dp, "tiers": tiers, "draining": state.draining}
    ready = state.store_open and dp is not False and all(tiers.values()) and not state.draining
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format from the daemon's own registry."""
    require_admin(request)
    body = await asyncio.to_thread(request.app[METRICS].exposition)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def stats_json(snap: Snapshot, started_at: float) -> dict[str, object]:
    """The global view of /v1/stats."""
    s = snap.store
    out: dict[str, object] = asdict(s)
    out["tiers"] = [{**asdict(v.stats), "kind": v.kind, "up": v.up} for v in snap.tiers]
    top = s.tiers[0]
    top_reads = top.hits + sum(top.misses.values())
    out["hit_rate"] = {
        "lookup_chunks": s.lookup_hit_chunks / s.lookup_query_chunks if s.lookup_query_chunks else None,
        "gets": s.get_hits / s.gets if s.gets else None,
        "top_tier_reads": top.hits / top_reads if top_reads else None,
    }
    out["requests"] = {k: asdict(v) for k, v in sorted(snap.requests.items())}
    out["data_plane"] = snap.data_plane
    out.update(scope="all", time=snap.taken_at, uptime_s=round(snap.taken_at - started_at, 3))
    return out


def tenant_stats(store: TieredStore, who: scope.Caller) -> dict[str, object]:
    """The tenant view of /v1/stats: only the caller's chunks, counted in the local tiers."""
    local = [t for t in store.tiers if not t.shared]
    namespaces = []
    totals = {t.name: [0, 0] for t in local}
    for ns in scope.visible_namespaces(store, who):
        per: dict[str, dict[str, int]] = {}
        for tier in local:
            metas = [m for m in map(tier.meta, tier.keys(ns.id)) if m is not None]
            per[tier.name] = {"entries": len(metas), "bytes": sum(m.nbytes for m in metas)}
            totals[tier.name][0] += len(metas)
            totals[tier.name][1] += per[tier.name]["bytes"]
        namespaces.append({"namespace": ns.id.hex(), "tiers": per})
    tiers = [
        {
            "name": t.name,
            "capacity_bytes": t.capacity_bytes,
            "entries": totals[t.name][0],
            "used_bytes": totals[t.name][1],
        }
        for t in local
    ]
    return {
        "scope": "tenant",
        "tenant": who.tenant,
        "time": time.time(),
        "tiers": tiers,
        "namespaces": namespaces,
    }


@routes.get("/v1/stats")
async def stats(request: web.Request) -> web.Response:
    """Counters of the store and every tier (admins), or the caller's own occupancy (tenants)."""
    who = scope.caller(request)
    if not who.is_admin:
        return web.json_response(await asyncio.to_thread(tenant_stats, request.app[STORE], who))
    snap = await asyncio.to_thread(snapshot, request.app)
    return web.json_response(stats_json(snap, request.app[STATE].started_at))


@routes.get("/v1/history")
async def history(request: web.Request) -> web.Response:
    """The ring buffer of periodic counter samples (for rates over the last minutes)."""
    require_admin(request)
    return web.json_response(request.app[HISTORY].as_json())


@routes.get("/v1/config")
async def config(request: web.Request) -> web.Response:
    """The running configuration, secrets redacted."""
    return web.json_response(request.app[CONFIG].redacted(scope.caller(request).tenant))


def namespace_json(ns: Namespace) -> dict[str, object]:
    spec = ns.spec
    return {
        "namespace": ns.id.hex(),
        "tenant": ns.tenant,
        "model": spec.model.name,
        "revision": spec.model.revision,
        "num_layers": spec.num_layers,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "dtype": spec.dtype,
        "layout": spec.layout,
        "tp_rank": spec.shard.tp_rank,
        "tp_size": spec.shard.tp_size,
        "pp_rank": spec.shard.pp_rank,
        "pp_size": spec.shard.pp_size,
        "scheme": ns.scheme,
        "chunk_tokens": ns.chunk_tokens,
        "chunk_bytes": ns.chunk_nbytes,
    }


@routes.get("/v1/namespaces")
async def list_namespaces(request: web.Request) -> web.Response:
    """The registered namespaces the caller may see."""
    found = scope.visible_namespaces(request.app[STORE], scope.caller(request))
    return web.json_response({"namespaces": [namespace_json(ns) for ns in found]})


@routes.get("/v1/leases")
async def list_leases(request: web.Request) -> web.Response:
    """Live leases on the caller's chunks."""
    found = await asyncio.to_thread(scope.visible_leases, request.app[STORE], scope.caller(request))
    return web.json_response({"leases": [scope.lease_json(lease, ns) for lease, ns in found]})


@routes.delete("/v1/leases/{lease}")
async def release_lease(request: web.Request) -> web.Response:
    """Release one of the caller's leases (404 if unknown, expired or another tenant's)."""
    try:
        lease_id = int(request.match_info["lease"])
    except ValueError:
        raise ApiError(400, "lease ids are integers") from None
    store = request.app[STORE]
    mine = await asyncio.to_thread(scope.visible_leases, store, scope.caller(request))
    if not any(lease.id == lease_id for lease, _ in mine):
        raise ApiError(404, f"lease {lease_id} is unknown, expired or released")
    return web.json_response({"released": store.release(lease_id)})


@routes.post("/v1/lookup")
async def lookup(request: web.Request) -> web.Response:
    """Longest cached prefix of ``tokens`` (or of engine ``keys``) and where each hit chunk lives."""
    body = await read_json(request, request.app[CONFIG].admin.max_body_bytes)
    store = request.app[STORE]
    ns = scope.visible_namespace(store, scope.caller(request), field_str(body, "namespace"))
    lease, ttl = field_bool(body, "lease", False), opt_ttl(body)
    keys = field_keys(body, required=False) if "keys" in body else None
    tokens = None if keys is not None else field_tokens(body)
    return web.json_response(await asyncio.to_thread(_lookup, store, ns, tokens, keys, lease, ttl))


def _lookup(
    store: TieredStore,
    ns: Namespace,
    tokens: list[int] | None,
    keys: list[ChunkKey] | None,
    lease: bool,
    ttl: float | None,
) -> dict[str, object]:
    r = (
        store.lookup(ns, tokens, lease=False)
        if tokens is not None
        else store.lookup_keys(ns, keys or [], False)
    )
    n = 0
    while n < len(r.keys) and scope.owned(store, ns, r.keys[n]):  # hits end at the first chunk not ours
        n += 1
    hits = r.keys[:n]
    lease_id = store.pin(ns, list(hits), ttl) if lease and hits else None
    chunks = [
        {"key": k.hex(), "tier": r.tiers[i], "tiers": scope.tiers_holding(store, k, r.tiers[i])}
        for i, k in enumerate(hits)
    ]
    return {
        "hit_tokens": n * ns.chunk_tokens,
        "hit_chunks": n,
        "query_chunks": r.query_chunks,
        "chunks": chunks,
        "lease": lease_id,
    }
