"""The daemon's transfers: started, tracked, cancelled and resumed here; one registry per daemon.

The registry lives in the daemon's aiohttp lifecycle (:func:`transfers_ctx`):
it owns the tasks of running transfers (cancelled at shutdown), the link
estimates per peer (kept across transfers to the same peer) and the codec
measurements per namespace (measured once, on the first chunk a push reads),
the coders' speeds pushes have seen per (peer, namespace), and a pool of
idle connections to peers (a push starts on one when it finds one: no
TCP, HELLO or REGISTER round trips; closed at shutdown).
Finished transfers are kept for reading, the oldest dropped beyond ``keep``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace

import numpy as np
from aiohttp import web

from kvstore.errors import InvalidInput, KVStoreError
from kvstore.keys import ChunkKey, Namespace, NamespaceId
from kvstore.service.admin_state import STORE
from kvstore.service.migration.link import CoderRates, LinkEstimator, LinkTable
from kvstore.service.migration.planner import CodecOption
from kvstore.service.migration.progress import FINISHED, TransferProgress, TransferState
from kvstore.service.migration.transfer import TransferRequest, run
from kvstore.service.migration.transfer_peers import PeerPool
from kvstore.service.migration.transfer_codecs import CodecCandidate, ladder, measure, namespace_cachegen_params, select
from kvstore.tiers.store import TieredStore

log = logging.getLogger("kvstore.transfer")


class UnknownTransfer(KVStoreError, KeyError):
    """No transfer of that id (or another tenant's)."""


class TransferRegistry:
    """Transfers of one daemon (see the module docstring). Event-loop thread only."""

    def __init__(self, store: TieredStore, keep: int = 256, tls_ca: str | None = None) -> None:
        self.store = store
        self.links = LinkTable()
        self.peers = PeerPool()
        self._coders: dict[tuple[str, NamespaceId], CoderRates] = {}
        self.keep = keep
        self.tls_ca = tls_ca
        self._progress: dict[str, TransferProgress] = {}
        self._requests: dict[str, TransferRequest] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._measured: dict[tuple[NamespaceId, str], list[CodecOption]] = {}
        self._seq = itertools.count(1)

    async def start(self, req: TransferRequest, codec_policy: str = "raw") -> TransferProgress:
        """Start a transfer in the background; its progress record (state ``running``).

        Raises:
            InvalidInput: an unknown codec policy, no keys, or a policy other than raw on a pull.
        """
        if not req.keys:
            raise InvalidInput("a transfer needs at least one chunk")
        if req.direction == "pull" and codec_policy != "raw":
            raise InvalidInput("pulls move raw chunks; codec policies apply to pushes")
        candidates = select(ladder(namespace_cachegen_params(self.store, req.namespace)), codec_policy)
        if req.tls_ca is None and self.tls_ca is not None:
            req = replace(req, tls_ca=self.tls_ca)
        tid = f"t{next(self._seq)}-{secrets.token_hex(4)}"
        progress = TransferProgress(tid, req.direction, req.peer_url, req.namespace.id.hex(), req.namespace.tenant,
                                    codec_policy, len(req.keys), req.deadline_s)  # fmt: skip
        self._progress[tid] = progress
        if req.direction == "push" and codec_policy != "raw":
            req = replace(req, codec_options=tuple(await self._options(req.namespace, req.keys, candidates)))
        self._requests[tid] = req
        self._launch(tid)
        self._trim()
        return progress

    def get(self, tid: str, tenant: str | None = None) -> TransferProgress:
        """A transfer's progress; ``tenant`` (None: any) must own it.

        Raises:
            UnknownTransfer: no such transfer for this caller.
        """
        found = self._progress.get(tid)
        if found is None or (tenant is not None and found.tenant != tenant):
            raise UnknownTransfer(f"no transfer {tid!r}")
        return found

    def listing(self, tenant: str | None = None) -> list[TransferProgress]:
        return [p for p in self._progress.values() if tenant is None or p.tenant == tenant]

    async def wait(self, tid: str) -> TransferProgress:
        task = self._tasks.get(tid)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        return self._progress[tid]

    def cancel(self, tid: str, tenant: str | None = None) -> TransferProgress:
        progress = self.get(tid, tenant)
        task = self._tasks.get(tid)
        if task is not None and not task.done():
            task.cancel()
        return progress

    def resume(self, tid: str, tenant: str | None = None) -> TransferProgress:
        """Run a failed or cancelled transfer again: only the chunks not yet acknowledged are sent.

        Raises:
            UnknownTransfer; InvalidInput: the transfer is still running or already done.
        """
        progress = self.get(tid, tenant)
        if progress.state not in (TransferState.FAILED, TransferState.CANCELLED):
            raise InvalidInput(f"transfer {tid} is {progress.state.value}; only failed or cancelled ones resume")
        progress.error, progress.finished_at = None, None
        self._launch(tid)
        return progress

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.peers.close()

    def _launch(self, tid: str) -> None:
        progress, req = self._progress[tid], self._requests[tid]
        progress.state = TransferState.RUNNING
        link = self.links.link(req.peer_url)
        self._tasks[tid] = asyncio.create_task(self._run(req, progress, link))

    async def _run(self, req: TransferRequest, progress: TransferProgress, link: LinkEstimator) -> None:
        try:
            coders = self._coders.setdefault((req.peer_url, req.namespace.id), CoderRates())
            await run(self.store, req, progress, link, self.peers, coders)
        except asyncio.CancelledError:
            progress.finish(TransferState.CANCELLED, "cancelled")
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is reported in the progress record
            progress.finish(TransferState.FAILED, f"{type(exc).__name__}: {exc}")
            log.warning("transfer %s failed: %s", progress.id, exc)
            return
        incomplete = progress.chunks_missing
        progress.finish(TransferState.DONE, f"{incomplete} chunk(s) not held locally" if incomplete else None)

    async def _options(self, ns: Namespace, keys: Sequence[ChunkKey],
                       cands: Sequence[CodecCandidate]) -> list[CodecOption]:
        cache_key = (ns.id, ",".join(c.label for c in cands))
        found = self._measured.get(cache_key)
        if found is not None:
            return found
        sample = None
        for key in keys[:8]:
            out = np.empty(ns.chunk_nbytes, dtype=np.uint8)
            n = await asyncio.to_thread(self.store.get, ns, key, out)
            if n is not None:
                sample = out[:n]
                break
        if sample is None:
            return [CodecOption("raw", "raw")]
        options = await asyncio.to_thread(measure, cands, sample, ns)
        self._measured[cache_key] = options
        return options

    def _trim(self) -> None:
        finished = [tid for tid, p in self._progress.items() if p.state in FINISHED]
        for tid in finished[: max(0, len(self._progress) - self.keep)]:
            self._progress.pop(tid, None)
            self._requests.pop(tid, None)
            self._tasks.pop(tid, None)


TRANSFERS = web.AppKey("transfers", TransferRegistry)


def transfers_ctx_for(tls_ca: str | None) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that opens the registry after the store and cancels running transfers on the way out."""

    async def transfers_ctx(app: web.Application) -> AsyncIterator[None]:
        app[TRANSFERS] = registry = TransferRegistry(app[STORE], tls_ca=tls_ca)
        yield
        await registry.close()

    return transfers_ctx
