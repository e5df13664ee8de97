"""A push's announcements to its peer: announce what it will send, withdraw what it will not.

A push (kvstore.service.migration.transfer) announces its remaining chunks
before it sends the first, so a lookup on the peer that asks to wait
(``wait_s``) waits for them instead of recomputing what is on the wire; a
chunk it finds it does not hold is withdrawn at once, and a push that fails
or is cancelled withdraws everything it did not deliver, so the peer's
lookups stop waiting. All of this is best effort: an announcement the peer
refuses (an older daemon, a bound on the ttl or on its registry) costs the
peer's lookups their wait, never the transfer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvstore.client.aio import AsyncClient
from kvstore.errors import KVStoreError
from kvstore.keys import ChunkKey, Namespace

if TYPE_CHECKING:
    from kvstore.service.migration.progress import TransferProgress
    from kvstore.service.migration.transfer import TransferRequest

log = logging.getLogger("kvstore.transfer")

BATCH = 4096  # keys per ANNOUNCE
WITHDRAW_TIMEOUT_S = 5.0


async def announce(client: AsyncClient, ns: Namespace, keys: Sequence[ChunkKey], ttl_s: float | None) -> None:
    """Announce ``keys`` to the peer for ``ttl_s`` (None: announce nothing); refusals are logged."""
    if ttl_s is None:
        return
    try:
        for i in range(0, len(keys), BATCH):
            await client.announce(ns, keys[i : i + BATCH], ttl_s)
    except (KVStoreError, OSError) as exc:
        if isinstance(exc, ConnectionError):
            raise  # the push itself resumes after a dropped connection
        log.warning("the peer refused the announcement of %d chunks: %s", len(keys), exc)


async def withdraw(client: AsyncClient, ns: Namespace, keys: Sequence[ChunkKey], ttl_s: float | None) -> None:
    """Withdraw ``keys`` from the peer's expectations (when they were announced); refusals are logged."""
    if ttl_s is None or not keys:
        return
    try:
        for i in range(0, len(keys), BATCH):
            await client.withdraw(ns, keys[i : i + BATCH])
    except (KVStoreError, OSError) as exc:
        if isinstance(exc, ConnectionError):
            raise
        log.warning("withdrawing %d chunks from the peer failed: %s", len(keys), exc)


async def withdraw_unsent(req: TransferRequest, progress: TransferProgress) -> None:
    """After a failed or cancelled push: withdraw every chunk the peer did not receive (on a new connection)."""
    unsent = [k for k in req.keys if k not in progress.done]
    if not unsent:
        return
    client = AsyncClient(req.peer_url, token=req.token, timeout_s=WITHDRAW_TIMEOUT_S, retries=0, pool_size=1,
                         use_shm=False, tls=req.tls, tls_ca=req.tls_ca)
    try:
        await asyncio.wait_for(withdraw(client, req.namespace, unsent, req.announce_ttl_s), 2 * WITHDRAW_TIMEOUT_S)
    except (KVStoreError, OSError, TimeoutError) as exc:  # the announcement expires by itself
        log.warning("could not withdraw %d unsent chunks from %s: %s", len(unsent), req.peer_url, exc)
    finally:
        await client.close()
