"""A minimal HTTP front of the tiered store: register namespaces, put, get, look up.

This is the small daemon ``kvstore serve`` runs until the binary data plane
lands; it binds to loopback only. Chunk bytes travel as raw request and
response bodies; everything else is JSON. The store lives in aiohttp's
lifecycle: opened in a cleanup context, closed when the app stops.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import AsyncIterator
from dataclasses import asdict

from aiohttp import web

from kvstore.builder import TiersConfig, build_store
from kvstore.errors import InvalidInput, KVStoreError, UnknownName, UnknownNamespace
from kvstore.keys import ChunkKey, Namespace, NamespaceId
from kvstore.spec import KVSpec, ModelFingerprint
from kvstore.tiers.store import TieredStore

STORE = web.AppKey("store", TieredStore)
MAX_BODY = 1 << 30


def check_bind(host: str) -> None:
    """Refuse any address but loopback: this server has no authentication.

    Raises:
        InvalidInput: a non-loopback address.
    """
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise InvalidInput(f"refusing to bind {host!r}: without authentication kvstore serves loopback only")


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _errors(request: web.Request, handler):  # type: ignore[no-untyped-def]
    try:
        return await handler(request)
    except UnknownNamespace as e:
        return _json_error(404, str(e))
    except (InvalidInput, UnknownName, ValueError, json.JSONDecodeError) as e:
        return _json_error(400, str(e))
    except KVStoreError as e:
        return _json_error(503, str(e))


def _namespace(request: web.Request) -> Namespace:
    try:
        ns_id = bytes.fromhex(request.match_info["ns"])
    except ValueError:
        raise InvalidInput("namespace id must be hex") from None
    return request.app[STORE].namespace(NamespaceId(ns_id))


def _key(request: web.Request) -> ChunkKey:
    try:
        key = bytes.fromhex(request.match_info["key"])
    except ValueError:
        raise InvalidInput("chunk key must be hex") from None
    if len(key) != 32:
        raise InvalidInput("chunk key must be 32 bytes (64 hex digits)")
    return ChunkKey(key)


async def register(request: web.Request) -> web.Response:
    body = await request.json()
    if not isinstance(body, dict):
        raise InvalidInput("expected a JSON object")
    try:
        spec = KVSpec(
            ModelFingerprint(str(body["model"]), str(body.get("revision", ""))),
            int(body["num_layers"]),
            int(body["num_kv_heads"]),
            int(body["head_dim"]),
            body.get("dtype", "bfloat16"),
            body.get("layout", "kv_separate"),
        )
        ns = Namespace(str(body["tenant"]), spec, str(body.get("scheme", "sha256-chain-v1")),
                       int(body.get("chunk_tokens", 256)))
    except KeyError as e:
        raise InvalidInput(f"missing field {e}") from None
    request.app[STORE].register_namespace(ns)
    return web.json_response({"namespace": ns.id.hex(), "chunk_bytes": ns.chunk_nbytes})


async def put_chunk(request: web.Request) -> web.Response:
    ns, key = _namespace(request), _key(request)
    data = await request.read()
    stored = request.app[STORE].put(ns, key, data)
    return web.json_response({"stored": stored}, status=201 if stored else 507)


async def get_chunk(request: web.Request) -> web.Response:
    ns, key = _namespace(request), _key(request)
    store = request.app[STORE]
    meta = next((m for t in store.tiers if (m := t.meta(key)) is not None), None)
    size = meta.nbytes if meta is not None else store.config.max_chunk_bytes
    out = bytearray(size)
    n = store.get(ns, key, out)
    if n is None:
        return _json_error(404, "miss")
    return web.Response(body=bytes(memoryview(out)[:n]), content_type="application/octet-stream")


async def lookup(request: web.Request) -> web.Response:
    ns = _namespace(request)
    body = await request.json()
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list):
        raise InvalidInput("expected {\"tokens\": [int, ...]}")
    r = request.app[STORE].lookup(ns, tokens, lease=False)
    return web.json_response(
        {"hit_tokens": r.hit_tokens, "keys": [k.hex() for k in r.keys], "tiers": list(r.tiers)}
    )


async def stats(request: web.Request) -> web.Response:
    s = request.app[STORE].stats()
    return web.json_response(json.loads(json.dumps(asdict(s), default=str)))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def make_app(tiers: TiersConfig) -> web.Application:
    """The HTTP application; the store opens on startup and closes on cleanup."""
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_errors])

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        app[STORE] = build_store(tiers)
        yield
        app[STORE].close()

    app.cleanup_ctx.append(store_ctx)
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/v1/stats", stats),
            web.post("/v1/namespaces", register),
            web.put("/v1/chunks/{ns}/{key}", put_chunk),
            web.get("/v1/chunks/{ns}/{key}", get_chunk),
            web.post("/v1/lookup/{ns}", lookup),
        ]
    )
    return app
