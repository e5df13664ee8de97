"""The admin HTTP API: its middlewares (errors, latency, auth) and its routes.

Auth: when tokens are configured every endpoint but the probes (``/healthz``,
``/readyz``), the static status page (``/``) and ``/openapi.json`` needs
``Authorization: Bearer <token>``; the token's tenant scopes what the
request may see (admin_scope). Without tokens the daemon serves loopback
only, every caller is an admin, and a request must name a loopback Host
(a web page that rebinds its own name to 127.0.0.1 is refused). Reference:
docs/daemon.md.
"""

from __future__ import annotations

import time

from aiohttp import web

from kvstore.service import admin_events, admin_ops, admin_routes
from kvstore.service.admin_io import Handler, errors_middleware, json_error
from kvstore.service.admin_openapi import openapi_document
from kvstore.service.admin_scope import Caller, set_caller
from kvstore.service.admin_state import CONFIG, METRICS, STATE, STORE
from kvstore.service.admin_status import STATUS_PAGE
from kvstore.service.config import ALL_TENANTS, DaemonConfig
from kvstore.service.net import is_loopback

PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/openapi.json"})
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="kvstore"'}


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Attach the caller's tenant; 401 without a valid bearer token when auth is on."""
    config = request.app[CONFIG]
    auth = config.auth
    if not auth.enabled:
        host = request.url.host or ""
        if not (is_loopback(host) or host == config.admin.host):
            return json_error(
                403, f"Host {host!r} is not this daemon (without tokens only loopback names are served)"
            )
        set_caller(request, Caller(ALL_TENANTS))
        return await handler(request)
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return json_error(401, "missing bearer token: send 'Authorization: Bearer <token>'", _CHALLENGE)
    tenant = auth.tenant_of(token.strip())
    if tenant is None:
        return json_error(401, "invalid bearer token", _CHALLENGE)
    set_caller(request, Caller(tenant))
    return await handler(request)


@web.middleware
async def latency_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count the request in flight and observe its latency by route template (bounded label values)."""
    start = time.perf_counter()
    status = 500
    inflight = request.app[STATE].inflight
    inflight.enter()
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        inflight.leave()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        request.app[METRICS].admin_latency.labels(route, request.method, str(status)).observe(
            time.perf_counter() - start
        )


async def status_page(request: web.Request) -> web.Response:
    """The status page: static HTML whose script polls /v1/stats and /v1/history."""
    return web.Response(text=STATUS_PAGE, content_type="text/html", headers={"Cache-Control": "no-store"})


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3 document of this API, with the running store's tier names."""
    store = request.app.get(STORE)
    if store is None:
        return web.json_response(openapi_document())
    names = [t.name for t in store.tiers]
    return web.json_response(openapi_document(names, [n for n in names if not store.codecs.encoded(n)]))


def make_admin_app(config: DaemonConfig) -> web.Application:
    """The admin application with its routes; daemon.py adds the resources' cleanup contexts."""
    app = web.Application(
        client_max_size=max(config.admin.max_body_bytes, config.admin.max_chunk_bytes),
        middlewares=[latency_middleware, errors_middleware, auth_middleware],
    )
    app[CONFIG] = config
    app.router.add_get("/", status_page)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_routes(admin_routes.routes)
    app.router.add_routes(admin_ops.routes)
    app.router.add_routes(admin_events.routes)
    return app
