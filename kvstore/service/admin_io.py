"""Request and reply plumbing of the admin API: bounded bodies, JSON, typed fields, errors.

Every error leaves as JSON ``{"error": message}`` with a status code that
says whose fault it was (4xx) or what is unavailable (503); nothing in a
request is ever evaluated, only parsed as JSON and checked field by field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from kvstore.errors import (
    Busy,
    CapacityError,
    ChunkTooLarge,
    InvalidInput,
    KVStoreError,
    LeaseError,
    RemoteUnavailable,
    UnknownName,
    UnknownNamespace,
)
from kvstore.keys import KEY_BYTES, ChunkKey, NamespaceId

log = logging.getLogger("kvstore.admin")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_KEYS = 65536
"""Most keys one request may name."""


class ApiError(Exception):
    """An HTTP error with a JSON body; raised by handlers, rendered by :func:`errors_middleware`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (UnknownNamespace, 404),
    (LeaseError, 404),
    (ChunkTooLarge, 413),
    (InvalidInput, 400),
    (UnknownName, 400),
    (ValueError, 400),
    (RemoteUnavailable, 503),
    (Busy, 503),
    (CapacityError, 507),
)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every failure as JSON; unexpected ones are logged and answered 500."""
    try:
        return await handler(request)
    except ApiError as e:
        return json_error(e.status, e.message, e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {
            k: v for k, v in e.headers.items() if k.lower() in ("allow", "www-authenticate", "retry-after")
        }
        return json_error(e.status, f"{e.reason.lower()}: {request.method} {request.path}", headers)
    except KVStoreError as e:
        for kind, status in _STATUS:
            if isinstance(e, kind):
                return json_error(status, str(e))
        log.exception("admin request failed", extra={"fields": {"path": request.path}})
        return json_error(500, f"{type(e).__name__}: {e}")
    except ValueError as e:
        return json_error(400, str(e))
    except Exception:
        log.exception("admin request failed", extra={"fields": {"path": request.path}})
        return json_error(500, "internal error (see the daemon's log)")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes before buffering it."""
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes")
    parts: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def read_json(request: web.Request, limit: int) -> dict[str, object]:
    """The body as a JSON object (400 if it is not one, 413 if too large).

    The body must be declared ``application/json``: a browser cannot send that
    type cross-origin without a CORS preflight (which this API never grants),
    so a web page cannot forge admin requests to a loopback daemon (415).
    """
    if request.content_type != "application/json":
        raise ApiError(415, "send the body as JSON with 'Content-Type: application/json'")
    raw = await read_body(request, limit)
    if not raw:
        raise ApiError(400, "expected a JSON object in the request body")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"bad JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "expected a JSON object in the request body")
    return body


def field_str(body: dict[str, object], name: str, default: str | None = None) -> str:
    value = body.get(name, default)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"field {name!r} must be a non-empty string")
    return value


def opt_str(body: dict[str, object], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"field {name!r} must be a non-empty string")
    return value


def field_int(body: dict[str, object], name: str, default: int | None = None, minimum: int = 0) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ApiError(400, f"field {name!r} must be an integer >= {minimum}")
    return value


def field_bool(body: dict[str, object], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise ApiError(400, f"field {name!r} must be true or false")
    return value


def opt_ttl(body: dict[str, object]) -> float | None:
    value = body.get("ttl_s")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
        raise ApiError(400, "field 'ttl_s' must be a number of seconds in (0, 86400]")
    return float(value)


def hex_id(text: str, what: str = "namespace") -> NamespaceId:
    """A 32-byte id from 64 hex digits."""
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ApiError(400, f"{what} id must be hex") from None
    if len(raw) != KEY_BYTES:
        raise ApiError(400, f"{what} id must be {KEY_BYTES} bytes ({2 * KEY_BYTES} hex digits)")
    return NamespaceId(raw)


def hex_key(text: object) -> ChunkKey:
    if not isinstance(text, str):
        raise ApiError(400, "chunk keys must be hex strings")
    return ChunkKey(bytes(hex_id(text, "chunk key")))


def field_keys(body: dict[str, object], name: str = "keys", required: bool = True) -> list[ChunkKey] | None:
    """A list of hex chunk keys (None when absent and not required)."""
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, list) or (required and not value):
        raise ApiError(400, f"field {name!r} must be a non-empty list of hex chunk keys")
    if len(value) > MAX_KEYS:
        raise ApiError(413, f"at most {MAX_KEYS} keys per request")
    return [hex_key(k) for k in value]


def field_tokens(body: dict[str, object]) -> list[int]:
    value = body.get("tokens")
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ApiError(400, "field 'tokens' must be a list of integer token ids")
    return value
