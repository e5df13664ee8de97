"""A small asyncio client of the daemon's admin API for transfers (start, progress, cancel, resume).

    async with AdminClient("http://127.0.0.1:7482", token=admin_token) as admin:
        t = await admin.start_transfer("kvstore://peer:7481", ns_hex, keys=keys, deadline_s=2.0, codec="auto")
        t = await admin.wait_transfer(t.id)

Errors come back typed: 400 as :class:`InvalidInput`, 401/403 as
:class:`Unauthorized`/:class:`Forbidden`, 404 as :class:`UnknownNamespace`
(an unknown namespace or transfer), an unreachable daemon as
:class:`RemoteUnavailable`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

import aiohttp

from kvstore.errors import InvalidInput, KVStoreError, RemoteUnavailable, UnknownNamespace
from kvstore.service.protocol import Forbidden, ServerError, Unauthorized

FINISHED = frozenset({"done", "failed", "cancelled"})


@dataclass(frozen=True, slots=True)
class TransferStatus:
    """A transfer's progress as the admin API reports it (``raw`` holds every field)."""

    id: str
    state: str
    chunks_total: int
    chunks_done: int
    chunks_skipped: int
    bytes_sent: int
    estimate_bytes_per_s: float | None
    error: str | None
    raw: dict[str, Any]

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def fraction(self) -> float:
        done = self.chunks_done + self.chunks_skipped + int(self.raw.get("chunks_missing", 0))
        return done / self.chunks_total if self.chunks_total else 1.0

    @classmethod
    def of(cls, body: dict[str, Any]) -> TransferStatus:
        return cls(str(body["id"]), str(body["state"]), int(body["chunks_total"]), int(body["chunks_done"]),
                   int(body.get("chunks_skipped", 0)), int(body.get("bytes_sent", 0)),
                   body.get("estimate_bytes_per_s"), body.get("error"), body)  # fmt: skip


_STATUS_ERRORS: dict[int, type[KVStoreError]] = {
    400: InvalidInput, 401: Unauthorized, 403: Forbidden, 404: UnknownNamespace, 409: InvalidInput, 413: InvalidInput,
}  # fmt: skip


class AdminClient:
    """Transfers through one daemon's admin API (see the module docstring)."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def start_transfer(self, peer: str, namespace: str, *, keys: Sequence[str] | None = None,
                             tokens: Sequence[int] | None = None, all_chunks: bool = False, direction: str = "push",
                             peer_token: str | None = None, deadline_s: float | None = None, codec: str = "raw",
                             recompute_s: float | None = None, tls: bool = False, window: int = 4) -> TransferStatus:
        """Start a transfer on this daemon (push to ``peer``, or pull from it).

        Raises:
            InvalidInput, Unauthorized, Forbidden, UnknownNamespace, RemoteUnavailable.
        """
        body: dict[str, Any] = {"peer": peer, "namespace": namespace, "direction": direction, "codec": codec,
                                "tls": tls, "window": window}  # fmt: skip
        if keys is not None:
            body["keys"] = list(keys)
        if tokens is not None:
            body["tokens"] = list(tokens)
        if all_chunks:
            body["all"] = True
        for name, value in (("token", peer_token), ("deadline_s", deadline_s), ("recompute_s", recompute_s)):
            if value is not None:
                body[name] = value
        return TransferStatus.of(await self._request("POST", "/v1/transfers", body))

    async def transfer(self, transfer_id: str) -> TransferStatus:
        """A transfer's progress (with its per-chunk records in ``raw["chunks"]``)."""
        return TransferStatus.of(await self._request("GET", f"/v1/transfers/{transfer_id}"))

    async def transfers(self) -> list[TransferStatus]:
        return [TransferStatus.of(t) for t in (await self._request("GET", "/v1/transfers"))["transfers"]]

    async def cancel_transfer(self, transfer_id: str) -> TransferStatus:
        return TransferStatus.of(await self._request("DELETE", f"/v1/transfers/{transfer_id}"))

    async def resume_transfer(self, transfer_id: str) -> TransferStatus:
        return TransferStatus.of(await self._request("POST", f"/v1/transfers/{transfer_id}/resume"))

    async def wait_transfer(self, transfer_id: str, *, poll_s: float = 0.1,
                            timeout_s: float | None = None) -> TransferStatus:
        """Poll until the transfer is done, failed or cancelled.

        Raises:
            TimeoutError: still running after ``timeout_s``.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = await self.transfer(transfer_id)
            if status.finished:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"transfer {transfer_id} still {status.state} after {timeout_s} s")
            await asyncio.sleep(poll_s)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        try:
            async with self._session.request(method, self.url + path, json=body) as r:
                payload = await r.json(content_type=None)
                status = r.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RemoteUnavailable(f"admin API {self.url} unreachable: {exc}") from exc
        if status >= 400:
            message = payload.get("error", str(payload)) if isinstance(payload, dict) else str(payload)
            raise _STATUS_ERRORS.get(status, ServerError)(f"{method} {path}: {status} {message}")
        if not isinstance(payload, dict):
            raise ServerError(f"{method} {path}: the reply is not a JSON object")
        return payload
