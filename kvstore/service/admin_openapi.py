"""The OpenAPI 3.0 document of the admin API, served at /openapi.json.

Built from small helpers so that each endpoint is a few lines; a test checks
that it validates and that it names exactly the routes the app serves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, get_args

from kvstore import keys
from kvstore.keys import MAX_CHUNK_TOKENS
from kvstore.service.admin_io import MAX_KEYS
from kvstore.service.migration import transfer_routes
from kvstore.spec import DType, Layout

JSON = dict[str, Any]


def _ref(name: str) -> JSON:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], **props: JSON) -> JSON:
    out: JSON = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    return out


def _req(required: list[str], **props: JSON) -> JSON:
    """A request body: as :func:`_obj`, and no field the server does not read."""
    return {**_obj(required, **props), "additionalProperties": False}


def _arr(items: JSON) -> JSON:
    return {"type": "array", "items": items}


_STR, _INT, _NUM, _BOOL = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
_HEX = {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}
_NAME = {"type": "string", "minLength": 1}
_KEYS = {"type": "array", "items": _HEX, "maxItems": MAX_KEYS}
_TTL = {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 86400}
_TOKEN = {"type": "integer", "minimum": 0, "maximum": (1 << 32) - 1}
_ANY = {"type": "object", "additionalProperties": True}


def _json(schema: JSON, description: str = "OK") -> JSON:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> JSON:
    reasons = {
        400: "bad request (bad JSON, bad field)",
        401: "missing or invalid bearer token",
        403: "not allowed for this token's tenant",
        404: "unknown namespace, chunk, lease or tier",
        409: "key stored under another namespace",
        413: "request body too large",
        415: "the body is not declared application/json",
        503: "a tier (Redis) is unavailable",
        507: "no room: everything pinned",
    }
    return {str(c): _json(_ref("Error"), reasons[c]) for c in codes}


def _op(summary: str, ok: JSON, *codes: int, body: JSON | None = None, public: bool = False) -> JSON:
    """One operation; a JSON ``body`` also brings its 400, 413 and 415 answers."""
    if body is not None:
        codes = tuple(sorted({*codes, 400, 413, 415}))
    op: JSON = {"summary": summary, "responses": {"200": ok, **_errors(*codes)}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if public:
        op["security"] = []
    return op


_NULL_INT = {**_INT, "nullable": True}


def _request_schemas(tiers: Sequence[str], raw_tiers: Sequence[str]) -> JSON:
    """Request bodies, as strict as the handlers' checks (admin_ops, admin_routes).

    What JSON Schema cannot say is left to the server (a clear 400): a rank
    must be below its size (``tp_rank < tp_size``, ``pp_rank < pp_size``).
    ``tiers`` and ``raw_tiers`` (tiers that hold raw KV, which moves need)
    are the running daemon's; empty, tier names are free strings.
    """
    ints = ("num_layers", "num_kv_heads", "head_dim", "tp_size", "pp_size")
    spec: JSON = {
        "model": _NAME,
        "revision": _NAME,
        "dtype": {**_STR, "enum": list(get_args(DType))},
        "layout": {**_STR, "enum": list(get_args(Layout))},
        "scheme": {**_STR, "enum": scheme_names()},
        **{k: {**_INT, "minimum": 1} for k in ints},
        "tp_rank": {**_INT, "minimum": 0},
        "pp_rank": {**_INT, "minimum": 0},
        "chunk_tokens": {**_INT, "minimum": 1, "maximum": MAX_CHUNK_TOKENS},
    }
    # mla_latent stores one latent vector per token: exactly one kv head
    mla = {
        "anyOf": [
            {"not": {"required": ["layout"]}},
            {"properties": {"layout": {"enum": ["kv_separate"]}}},
            {"properties": {"num_kv_heads": {"enum": [1]}}},
        ]
    }
    register = {
        **_req(["tenant", "model", "num_layers", "num_kv_heads", "head_dim"], tenant=_NAME, **spec),
        **mla,
    }
    register["description"] = (
        "`tenant` may be left out with a tenant token (it defaults to the token's tenant)."
    )
    tier = {**_STR, "enum": list(tiers)} if tiers else _NAME
    return {
        "NamespaceSpec": register,
        "Namespace": _obj(["namespace", "tenant"], namespace=_HEX, tenant=_STR, chunk_bytes=_INT,
                          **{k: _STR if v.get("type") == "string" else _INT for k, v in spec.items()}),
        "LookupRequest": {**_req(["namespace"], namespace=_HEX, tokens=_arr(_TOKEN), keys=_KEYS, lease=_BOOL,
                                 ttl_s=_TTL), "anyOf": [{"required": ["tokens"]}, {"required": ["keys"]}]},
        "PinRequest": _req(["namespace", "keys"], namespace=_HEX, keys={**_KEYS, "minItems": 1}, ttl_s=_TTL),
        "EvictRequest": _req(["namespace"], namespace=_HEX, keys=_KEYS, tier=tier),
        "ClearRequest": _req(["namespace"], namespace=_HEX),
        "MoveRequest": {**_req(["namespace", "keys", "from", "to"], namespace=_HEX, keys={**_KEYS, "minItems": 1},
                               remove_source=_BOOL, **_move_tiers(raw_tiers)), **_distinct(raw_tiers)},
    }  # fmt: skip


def _move_tiers(raw_tiers: Sequence[str]) -> JSON:
    name = {**_STR, "enum": list(raw_tiers)} if len(raw_tiers) >= 2 else _NAME
    return {"from": name, "to": name}


def _distinct(raw_tiers: Sequence[str]) -> JSON:
    """``from`` and ``to`` name different tiers: one branch per source tier."""
    if len(raw_tiers) < 2:
        return {}
    return {
        "anyOf": [
            {"properties": {"from": {"enum": [t]}, "to": {"enum": [u for u in raw_tiers if u != t]}}}
            for t in raw_tiers
        ]
    }


def scheme_names() -> list[str]:
    """The hash schemes a namespace may name (kvstore.keys)."""
    return keys.scheme_names()


def _result_schemas() -> JSON:
    chunk = _obj(["key", "tier", "tiers"], key=_HEX, tier=_STR, tiers=_arr(_STR))
    per_tier = {"type": "object", "additionalProperties": _INT}
    return {
        "Error": _obj(["error"], error=_STR),
        "LookupResult": _obj(["hit_tokens", "hit_chunks", "query_chunks", "chunks"], hit_tokens=_INT,
                             hit_chunks=_INT, query_chunks=_INT, chunks=_arr(chunk), lease=_NULL_INT),
        "Lease": _obj(["lease", "chunks"], lease=_INT, namespace={**_HEX, "nullable": True}, expires_in_s=_NUM,
                      chunks=_INT, tiers=per_tier, keys=_arr(_HEX)),
        "PinResult": _obj(["lease", "pinned", "missing"], lease=_NULL_INT, pinned=_arr(_HEX), missing=_arr(_HEX)),
        "MoveResult": _obj(["moved", "missing", "rejected"], moved=_arr(_HEX), missing=_arr(_HEX),
                           rejected=_arr(_HEX)),
    }  # fmt: skip


def _post(summary: str, ok: JSON, body: str, *codes: int) -> JSON:
    """A JSON POST on a namespace (401 without a token, 404 for an unknown namespace)."""
    return {"post": _op(summary, _json(ok), 401, 404, *codes, body=_ref(body))}


def _system_paths() -> JSON:
    text = {"description": "OK", "content": {"text/plain": {"schema": _STR}}}
    html = {"description": "the status page", "content": {"text/html": {"schema": _STR}}}
    ready = _op("Readiness: store open, data plane listening, tiers reachable", _json(_ANY), public=True)
    ready["responses"]["503"] = _json(_ANY, "not ready")
    return {
        "/": {"get": _op("Status page (HTML; its script polls /v1/stats)", html, public=True)},
        "/healthz": {"get": _op("Liveness: the process answers", _json(_ANY), public=True)},
        "/readyz": {"get": ready},
        "/metrics": {"get": _op("Prometheus text format (admin token)", text, 401, 403)},
        "/openapi.json": {"get": _op("This document", _json(_ANY), public=True)},
    }


def _v1_paths() -> JSON:
    listing = _obj(["namespaces"], namespaces=_arr(_ref("Namespace")))
    leases = _obj(["leases"], leases=_arr(_ref("Lease")))
    lease_id = [{"name": "lease", "in": "path", "required": True, "schema": _INT}]
    return {
        "/v1/stats": {"get": _op("Store and tier counters (admin) or the tenant's occupancy", _json(_ANY), 401)},
        "/v1/history": {"get": _op("Periodic counter samples (admin token)", _json(_ANY), 401, 403)},
        "/v1/config": {"get": _op("The running configuration, secrets redacted", _json(_ANY), 401)},
        "/v1/namespaces": {
            "get": _op("The caller's namespaces", _json(listing), 401),
            "post": _op("Register a namespace", _json(_ref("Namespace")), 401, 403, body=_ref("NamespaceSpec")),
        },
        "/v1/leases": {"get": _op("The caller's live leases", _json(leases), 401)},
        "/v1/leases/{lease}": {
            "parameters": lease_id,
            "delete": _op("Release a lease", _json(_obj(["released"], released=_BOOL)), 400, 401, 404),
        },
        "/v1/lookup": _post("Longest cached prefix and where each chunk lives", _ref("LookupResult"),
                            "LookupRequest"),
        "/v1/pin": _post("Pin chunks under a new lease", _ref("PinResult"), "PinRequest"),
        "/v1/evict": _post("Remove chunks or a namespace, from every tier or one",
                           _obj(["evicted"], evicted=_INT), "EvictRequest", 503),
        "/v1/clear": _post("Remove every chunk of a namespace", _obj(["removed"], removed=_INT),
                           "ClearRequest", 503),
        "/v1/move": _post("Copy chunks between tiers", _ref("MoveResult"), "MoveRequest"),
        "/v1/events": {"get": _events_op()},
    }  # fmt: skip


def _events_op() -> JSON:
    """``GET /v1/events``: a stream of vLLM-format KV event batches (kvstore/service/admin_events.py)."""
    stream = {"schema": {**_STR, "format": "binary"}}
    ok = {
        "description": "batches until the client leaves, `seconds` pass or the daemon drains",
        "content": {"application/vnd.kvstore.vllm-events": stream, "application/x-ndjson": stream},
    }
    op = _op("Stream the store's KV events (BlockStored, BlockRemoved, AllBlocksCleared)", ok, 400, 401, 503)
    op["parameters"] = [
        {"name": "format", "in": "query", "schema": {**_STR, "enum": ["msgpack", "json"]}},
        {"name": "interval_s", "in": "query", "schema": {**_NUM, "minimum": 0.01, "maximum": 10}},
        {"name": "seconds", "in": "query", "schema": {**_NUM, "minimum": 0, "maximum": 86400}},
    ]
    return op


def _chunk_paths() -> JSON:
    raw = {"application/octet-stream": {"schema": {**_STR, "format": "binary"}}}
    ns_key = [
        {"name": "ns", "in": "path", "required": True, "schema": _HEX},
        {"name": "key", "in": "path", "required": True, "schema": _HEX},
    ]
    put = _op("Store one chunk's raw bytes", _json(_ANY), 400, 401, 404, 409, 413, 507)
    put["requestBody"] = {"required": True, "content": raw}
    put["responses"]["201"] = put["responses"].pop("200")
    get = _op("One chunk's raw bytes", {"description": "chunk bytes", "content": raw}, 400, 401, 404)
    return {"/v1/chunks/{ns}/{key}": {"parameters": ns_key, "get": get, "put": put}}


def openapi_document(tiers: Sequence[str] = (), raw_tiers: Sequence[str] = ()) -> JSON:
    """The admin API as an OpenAPI 3.0.3 document.

    Args:
        tiers: the running daemon's tier names (the values of ``tier``); empty: any name.
        raw_tiers: those of them that hold raw KV (the values of a move's ``from`` and ``to``).
    """
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "kvstore admin API",
            "version": "1",
            "description": "Admin API of the kvstore daemon; see docs/daemon.md.",
        },
        "paths": {**_system_paths(), **_v1_paths(), **_chunk_paths(),
                  **transfer_routes.openapi_paths(_op, _json, _ref)},
        "components": {
            "schemas": {**_request_schemas(tiers, raw_tiers), **_result_schemas(),
                        **transfer_routes.openapi_schemas(_HEX, MAX_KEYS)},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
