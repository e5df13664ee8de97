"""Admin endpoints for transfers: start one, read its progress, cancel it, resume it; their OpenAPI parts.

A caller may move only namespaces it sees (its tenant's; admins: any) and
read only its own transfers. The daemon connects to the peer named in the
request, so starting a transfer needs a token wherever the daemon has tokens.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from aiohttp import web

from kvstore.client._frames import parse_url
from kvstore.errors import InvalidInput
from kvstore.keys import ChunkKey, Namespace, prefix_keys
from kvstore.service import admin_scope as scope
from kvstore.service.admin_io import ApiError, field_bool, field_keys, field_str, field_tokens, read_json
from kvstore.service.admin_state import CONFIG, STORE
from kvstore.service.migration.transfer import TransferRequest
from kvstore.service.migration.transfer_codecs import ladder
from kvstore.service.migration.transfer_registry import TRANSFERS, UnknownTransfer
from kvstore.tiers.store import TieredStore

MAX_LIST_KEYS = 65536
PEER_PATTERN = r"^kvstores?://[^\s/]+$"
_FIELDS = frozenset({"peer", "namespace", "keys", "tokens", "all", "direction", "token", "deadline_s", "codec",
                     "recompute_s", "tls", "window"})  # fmt: skip


def _tenant(request: web.Request) -> str | None:
    who = scope.caller(request)
    return None if who.is_admin else who.tenant


def _opt_number(body: dict[str, Any], name: str, positive: bool) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ApiError(400, f"field {name!r} must be a finite number {'> 0' if positive else '>= 0'}")
    return float(v)


def _keys(store: TieredStore, ns: Namespace, body: dict[str, Any], direction: str) -> list[ChunkKey]:
    given = [k for k in ("keys", "tokens", "all") if body.get(k) not in (None, False)]
    if len(given) != 1:
        raise ApiError(400, "name the chunks with exactly one of 'keys', 'tokens' or 'all': true")
    if given[0] == "keys":
        return field_keys(body) or []
    if given[0] == "tokens":
        tokens = field_tokens(body)
        if any(not 0 <= t < 1 << 32 for t in tokens):
            raise ApiError(400, "token ids must be in [0, 2**32)")
        return prefix_keys(ns, tokens)
    if body["all"] is not True:
        raise ApiError(400, "field 'all' must be true when given")
    if direction == "pull":
        raise ApiError(400, "a pull names its chunks with 'keys' or 'tokens'")
    found: dict[ChunkKey, None] = {}
    for tier in store.tiers:
        if not tier.shared:
            found.update((k, None) for k in tier.keys(ns.id))
    return list(found)[:MAX_LIST_KEYS]


async def start_transfer(request: web.Request) -> web.Response:
    """Start a push or pull of a namespace's chunks; the new transfer's progress."""
    body = await read_json(request, request.app[CONFIG].admin.max_body_bytes)
    unknown = set(body) - _FIELDS
    if unknown:
        raise ApiError(400, f"unknown field(s) {sorted(unknown)}")
    store = request.app[STORE]
    ns = scope.visible_namespace(store, scope.caller(request), field_str(body, "namespace"))
    peer = field_str(body, "peer")
    if not peer.startswith(("kvstore://", "kvstores://")) or len(peer) > 512:
        raise ApiError(400, "field 'peer' must be a data-plane URL: kvstore://host:port or kvstores://host:port")
    try:
        parse_url(peer)
    except InvalidInput as exc:
        raise ApiError(400, f"field 'peer': {exc}") from None
    direction = field_str(body, "direction", "push")
    if direction not in ("push", "pull"):
        raise ApiError(400, "field 'direction' must be 'push' or 'pull'")
    codec = field_str(body, "codec", "raw")
    token = body.get("token")
    if token is not None and (not isinstance(token, str) or not token or len(token) > 256):
        raise ApiError(400, "field 'token' must be a non-empty string")
    window = body.get("window", 4)
    if not isinstance(window, int) or isinstance(window, bool) or not 1 <= window <= 64:
        raise ApiError(400, "field 'window' must be an integer in [1, 64]")
    keys = await asyncio.to_thread(_keys, store, ns, body, direction)
    if not keys:
        raise ApiError(400, "no chunks to transfer (the namespace holds none here, or too few tokens for a chunk)")
    try:
        req = TransferRequest(peer, ns, tuple(keys), "pull" if direction == "pull" else "push", token, _opt_number(body, "deadline_s", True),
                              recompute_s=_opt_number(body, "recompute_s", False),
                              tls=field_bool(body, "tls", False) or peer.startswith("kvstores://"), window=window)
        progress = await request.app[TRANSFERS].start(req, codec)
    except InvalidInput as exc:
        raise ApiError(400, str(exc)) from None
    return web.json_response(progress.to_json())


async def list_transfers(request: web.Request) -> web.Response:
    """The caller's transfers, newest last, without per-chunk records."""
    found = request.app[TRANSFERS].listing(_tenant(request))
    return web.json_response({"transfers": [p.to_json(with_chunks=False) for p in found]})


def _one(request: web.Request, action: str) -> dict[str, object]:
    registry, tid, tenant = request.app[TRANSFERS], request.match_info["transfer"], _tenant(request)
    try:
        if action == "cancel":
            return registry.cancel(tid, tenant).to_json(with_chunks=False)
        if action == "resume":
            return registry.resume(tid, tenant).to_json(with_chunks=False)
        return registry.get(tid, tenant).to_json()
    except UnknownTransfer:
        raise ApiError(404, f"no transfer {tid!r}") from None
    except InvalidInput as exc:
        raise ApiError(409, str(exc)) from None


async def get_transfer(request: web.Request) -> web.Response:
    """One transfer's progress: chunks and bytes done, codec per chunk, link estimate, state, error."""
    return web.json_response(_one(request, "get"))


async def cancel_transfer(request: web.Request) -> web.Response:
    """Cancel a running transfer (chunks already acknowledged stay on the peer)."""
    return web.json_response(_one(request, "cancel"))


async def resume_transfer(request: web.Request) -> web.Response:
    """Run a failed or cancelled transfer again; only unacknowledged chunks are sent."""
    return web.json_response(_one(request, "resume"))


def add_routes(routes: web.RouteTableDef) -> None:
    routes.post("/v1/transfers")(start_transfer)
    routes.get("/v1/transfers")(list_transfers)
    routes.get("/v1/transfers/{transfer}")(get_transfer)
    routes.delete("/v1/transfers/{transfer}")(cancel_transfer)
    routes.post("/v1/transfers/{transfer}/resume")(resume_transfer)


# -- the OpenAPI parts (merged into admin_openapi's document) ----------------------------
def openapi_schemas(hex_schema: dict[str, Any], max_keys: int) -> dict[str, Any]:
    num = {"type": "number"}
    nullable_num = {**num, "nullable": True}
    labels = ["auto", *(c.label for c in ladder())]
    start = {
        "type": "object", "additionalProperties": False, "required": ["peer", "namespace"],
        "properties": {
            "peer": {"type": "string", "pattern": PEER_PATTERN, "maxLength": 512},
            "namespace": hex_schema,
            "keys": {"type": "array", "items": hex_schema, "minItems": 1, "maxItems": max_keys},
            "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": (1 << 32) - 1},
                       "minItems": 1},
            "all": {"type": "boolean", "enum": [True]},
            "direction": {"type": "string", "enum": ["push", "pull"]},
            "token": {"type": "string", "minLength": 1, "maxLength": 256},
            "deadline_s": {**num, "exclusiveMinimum": True, "minimum": 0, "maximum": 1e9},
            "codec": {"type": "string", "enum": labels},
            "recompute_s": {**num, "minimum": 0, "maximum": 1e9},
            "tls": {"type": "boolean"},
            "window": {"type": "integer", "minimum": 1, "maximum": 64},
        },
        "oneOf": [{"required": ["keys"]}, {"required": ["tokens"]}, {"required": ["all"]}],
        "description": "Exactly one of `keys`, `tokens` or `all` names the chunks; a pull takes `keys` or `tokens`; "
                       "codecs other than `raw` apply to pushes.",
    }  # fmt: skip
    chunk = {"type": "object", "properties": {"key": hex_schema, "codec": {"type": "string"},
                                              "raw_bytes": {"type": "integer"}, "sent_bytes": {"type": "integer"}}}
    ints = ("chunks_total", "chunks_done", "chunks_skipped", "chunks_missing", "bytes_raw", "bytes_sent", "resent",
            "reconnects", "relost")  # fmt: skip
    progress = {
        "type": "object",
        "required": ["id", "state", "chunks_total", "chunks_done"],
        "properties": {
            "id": {"type": "string"}, "direction": {"type": "string", "enum": ["push", "pull"]},
            "peer": {"type": "string"}, "namespace": hex_schema,
            "state": {"type": "string", "enum": ["pending", "running", "done", "failed", "cancelled"]},
            "codec_policy": {"type": "string"}, **{k: {"type": "integer"} for k in ints},
            "estimate_bytes_per_s": nullable_num, "projected_s": nullable_num, "deadline_s": nullable_num,
            "deadline_met": {"type": "boolean", "nullable": True}, "recompute_cheaper": {"type": "boolean"},
            "error": {"type": "string", "nullable": True}, "elapsed_s": num,
            "codecs": {"type": "object", "additionalProperties": {"type": "integer"}},
            "chunks": {"type": "array", "items": chunk},
        },
    }  # fmt: skip
    return {"TransferRequest": start, "TransferProgress": progress}


def openapi_paths(op: Any, json: Any, ref: Any) -> dict[str, Any]:
    """Paths for /v1/transfers; ``op``, ``json`` and ``ref`` are admin_openapi's helpers."""
    param = [{"name": "transfer", "in": "path", "required": True, "schema": {"type": "string"}}]
    listing = {"type": "object", "required": ["transfers"],
               "properties": {"transfers": {"type": "array", "items": ref("TransferProgress")}}}  # fmt: skip
    progress = json(ref("TransferProgress"))
    return {
        "/v1/transfers": {
            "get": op("The caller's transfers", json(listing), 401),
            "post": op("Start a push or pull of chunks to or from a peer daemon", progress, 401, 404,
                       body=ref("TransferRequest")),
        },
        "/v1/transfers/{transfer}": {
            "parameters": param,
            "get": op("A transfer's progress", progress, 401, 404),
            "delete": op("Cancel a transfer", progress, 401, 404),
        },
        "/v1/transfers/{transfer}/resume": {
            "parameters": param,
            "post": op("Resume a failed or cancelled transfer", progress, 401, 404, 409),
        },
    }  # fmt: skip
