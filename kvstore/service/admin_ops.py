"""Write-side admin endpoints: register, pin, evict, clear, move, and chunk bytes.

Every key a request names is checked against the namespace it names
(admin_scope.split_owned): a key stored under another namespace is treated
as absent, so no endpoint can pin, evict, move, read or overwrite another
tenant's chunk.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from kvstore.keys import ChunkKey, Namespace
from kvstore.service import admin_scope as scope
from kvstore.service.admin_io import (
    ApiError,
    field_bool,
    field_int,
    field_keys,
    field_str,
    hex_key,
    opt_str,
    opt_ttl,
    read_body,
    read_json,
)
from kvstore.service.admin_routes import namespace_json
from kvstore.service.admin_state import CONFIG, STORE
from kvstore.spec import KVSpec, ModelFingerprint, Shard
from kvstore.tiers.base import ChunkMeta
from kvstore.tiers.store import TieredStore

routes = web.RouteTableDef()


async def _body_ns(request: web.Request) -> tuple[dict[str, object], TieredStore, Namespace]:
    body = await read_json(request, request.app[CONFIG].admin.max_body_bytes)
    store = request.app[STORE]
    return body, store, scope.visible_namespace(store, scope.caller(request), field_str(body, "namespace"))


def _hex(keys: list[ChunkKey]) -> list[str]:
    return [k.hex() for k in keys]


@routes.post("/v1/namespaces")
async def register(request: web.Request) -> web.Response:
    """Register a namespace (idempotent); a tenant token registers for its own tenant only."""
    body = await read_json(request, request.app[CONFIG].admin.max_body_bytes)
    who = scope.caller(request)
    tenant = field_str(body, "tenant", None if who.is_admin else who.tenant)
    if not who.sees(tenant) or tenant == "*":
        raise ApiError(403, f"this token may register namespaces of tenant {who.tenant!r} only")
    shard = Shard(
        *(field_int(body, k, d) for k, d in (("tp_rank", 0), ("tp_size", 1), ("pp_rank", 0), ("pp_size", 1)))
    )
    spec = KVSpec(
        ModelFingerprint(field_str(body, "model"), opt_str(body, "revision") or ""),
        field_int(body, "num_layers", minimum=1),
        field_int(body, "num_kv_heads", minimum=1),
        field_int(body, "head_dim", minimum=1),
        field_str(body, "dtype", "bfloat16"),  # type: ignore[arg-type]  # KVSpec checks the Literal
        field_str(body, "layout", "kv_separate"),  # type: ignore[arg-type]
        shard,
    )
    ns = Namespace(
        tenant, spec, field_str(body, "scheme", "sha256-chain-v1"), field_int(body, "chunk_tokens", 256, 1)
    )
    request.app[STORE].register_namespace(ns)
    return web.json_response(namespace_json(ns))


@routes.post("/v1/pin")
async def pin(request: web.Request) -> web.Response:
    """Pin chunks of one namespace under a new lease (they cannot be evicted until it ends)."""
    body, store, ns = await _body_ns(request)
    keys = field_keys(body) or []
    ttl = opt_ttl(body)

    def work() -> dict[str, object]:
        mine, missing = scope.split_owned(store, ns, keys)
        lease = store.pin(ns, mine, ttl) if mine else None
        pinned = next((set(l.pins) for l in store.leases.live() if l.id == lease), set())
        missing += [k for k in mine if k not in pinned]
        return {"lease": lease, "pinned": _hex([k for k in mine if k in pinned]), "missing": _hex(missing)}

    return web.json_response(await asyncio.to_thread(work))


@routes.post("/v1/evict")
async def evict(request: web.Request) -> web.Response:
    """Remove chunks (the listed ``keys``, or all of the namespace) from every tier or from one ``tier``."""
    body, store, ns = await _body_ns(request)
    keys = field_keys(body, required=False)
    tier = opt_str(body, "tier")
    index = scope.tier_index(store, tier) if tier is not None else None
    return web.json_response({"evicted": await asyncio.to_thread(_evict, store, ns, keys, index)})


def _evict(store: TieredStore, ns: Namespace, keys: list[ChunkKey] | None, index: int | None) -> int:
    if index is None:
        if keys is None:
            return store.clear(ns)
        mine, _ = scope.split_owned(store, ns, keys)
        return sum(store.delete(ns, k) for k in mine)
    tier = store.tiers[index]
    if keys is None:
        targets = list(tier.keys(ns.id))
    else:
        targets = [k for k in keys if (m := tier.meta(k)) is not None and m.namespace == ns.id]
    n = 0
    for key in targets:
        if tier.delete(key):
            n += 1
        store.index.discard(key, index)
    return n


@routes.post("/v1/clear")
async def clear(request: web.Request) -> web.Response:
    """Remove every chunk of one namespace from every tier."""
    _, store, ns = await _body_ns(request)
    return web.json_response({"removed": await asyncio.to_thread(store.clear, ns)})


@routes.post("/v1/move")
async def move(request: web.Request) -> web.Response:
    """Copy chunks from one tier to another (promote to cpu, demote to disk...); optionally drop the source."""
    body, store, ns = await _body_ns(request)
    keys = field_keys(body) or []
    src = scope.tier_index(store, field_str(body, "from"))
    dst = scope.tier_index(store, field_str(body, "to"))
    if src == dst:
        raise ApiError(400, "'from' and 'to' name the same tier")
    drop = field_bool(body, "remove_source", False)
    for i in (src, dst):  # a copy would hand codec containers over as raw KV, or raw KV as containers
        if store.codecs.encoded(store.tiers[i].name):
            raise ApiError(400, f"tier {store.tiers[i].name!r} stores codec containers; moves need raw tiers")
    return web.json_response(await asyncio.to_thread(_move, store, ns, keys, src, dst, drop))


def _move(
    store: TieredStore, ns: Namespace, keys: list[ChunkKey], src: int, dst: int, drop: bool
) -> dict[str, object]:
    source, target = store.tiers[src], store.tiers[dst]
    out: dict[str, list[str]] = {"moved": [], "missing": [], "rejected": []}
    for key in keys:
        meta = source.meta(key)
        got = source.read(key) if meta is not None and meta.namespace == ns.id else None
        if got is None:
            out["missing"].append(key.hex())
            continue
        data, meta = got
        if not target.put(key, data, ChunkMeta(ns.id, int(data.size), meta.checksum, meta.cost)):
            out["rejected"].append(key.hex())
            continue
        store.index.add(key, dst)
        if drop and source.delete(key):
            store.index.discard(key, src)
        out["moved"].append(key.hex())
    return dict(out)


@routes.put("/v1/chunks/{ns}/{key}")
async def put_chunk(request: web.Request) -> web.Response:
    """Store one chunk's raw bytes (debugging and tests; engines use the data plane)."""
    store = request.app[STORE]
    ns = scope.visible_namespace(store, scope.caller(request), request.match_info["ns"])
    key = hex_key(request.match_info["key"])
    data = await read_body(request, request.app[CONFIG].admin.max_chunk_bytes)

    def work() -> bool:
        found = scope.chunk_meta(store, key)
        if found is not None and found[1].namespace != ns.id:
            raise ApiError(409, "this key is stored under another namespace")
        return store.put(ns, key, data)

    stored = await asyncio.to_thread(work)
    if not stored:
        raise ApiError(507, "the CPU tier is full of pinned chunks; retry later")
    return web.json_response({"stored": True}, status=201)


@routes.get("/v1/chunks/{ns}/{key}")
async def get_chunk(request: web.Request) -> web.Response:
    """One chunk's raw bytes, or 404 (absent, or stored under another namespace)."""
    store = request.app[STORE]
    ns = scope.visible_namespace(store, scope.caller(request), request.match_info["ns"])
    key = hex_key(request.match_info["key"])

    def work() -> bytes | None:
        found = scope.chunk_meta(store, key)
        if found is None or found[1].namespace != ns.id:
            return None
        size = found[1].nbytes
        if store.codecs.encoded(store.tiers[found[0]].name):  # a container: its KV is a full chunk
            size = max(size, ns.chunk_nbytes)
        out = bytearray(size)
        n = store.get(ns, key, out)
        return None if n is None else bytes(memoryview(out)[:n])

    data = await asyncio.to_thread(work)
    if data is None:
        raise ApiError(404, "miss: no such chunk in this namespace")
    return web.Response(body=data, content_type="application/octet-stream")
