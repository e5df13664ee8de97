"""Storing a request's new chunks off the request path: one worker thread, a bounded queue.

A request hands over a :class:`StoreJob` (references to its cache's per-layer
tensors, the token range to store, the keys) and returns at once; the worker
cuts the range into chunks in the namespace's dtype and puts them. This is
safe because transformers' ``DynamicLayer.update`` grows a cache by
concatenation: it replaces a layer's tensors and never writes into them, so
the tensors a job references keep their values while the request decodes on.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvstore.connectors.hf_backend import HFBackend
from kvstore.errors import InvalidInput
from kvstore.keys import ChunkKey, Namespace

if TYPE_CHECKING:
    from transformers import DynamicCache

log = logging.getLogger(__name__)

LayerKV = tuple[torch.Tensor, torch.Tensor]
"""One decoder layer's ``(keys, values)``, each ``[1, kv_heads, tokens, head_dim]``."""


@dataclass(frozen=True, slots=True)
class StoreJob:
    """Chunks ``first_chunk ..`` of a sequence, to be cut from ``layers`` and stored under ``keys``.

    Invariant: ``keys[i]`` names chunk ``first_chunk + i``, i.e. tokens
    ``[(first_chunk + i) * C, (first_chunk + i + 1) * C)``, and every layer
    tensor holds at least that many tokens of KV computed for exactly those tokens.
    """

    ns: Namespace
    keys: tuple[ChunkKey, ...]
    first_chunk: int
    layers: tuple[LayerKV, ...]


@dataclass(frozen=True, slots=True)
class WriterStats:
    """What the writer did so far.

    Attributes:
        jobs: jobs accepted into the queue.
        stored_chunks: chunks the backend said it holds.
        refused_chunks: chunks the backend could not take (its top tier full of pinned chunks).
        dropped_jobs: jobs not queued because the queue stayed full (backpressure).
        failed_jobs: jobs whose put raised (logged; the request was not affected).
        pending: jobs queued or running now.
    """

    jobs: int
    stored_chunks: int
    refused_chunks: int
    dropped_jobs: int
    failed_jobs: int
    pending: int


def snapshot(cache: DynamicCache) -> tuple[LayerKV, ...]:
    """References to every layer's current ``(keys, values)`` (no copy; see the module docstring).

    Raises:
        InvalidInput: a layer holds no KV tensors (not a filled full-attention cache).
    """
    out = []
    for i, layer in enumerate(cache.layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise InvalidInput(f"layer {i} of the cache holds no KV tensors")
        out.append((keys, values))
    return tuple(out)


def layers_to_chunk(layers: Sequence[LayerKV], start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Tokens ``[start, end)`` of per-layer KV as one ``[layers, 2, tokens, kv_heads, head_dim]`` chunk."""
    keys0 = layers[0][0]
    out = torch.empty((len(layers), 2, end - start, keys0.shape[1], keys0.shape[3]), dtype=dtype)
    for i, (keys, values) in enumerate(layers):
        out[i, 0].copy_(keys[0, :, start:end].transpose(0, 1))
        out[i, 1].copy_(values[0, :, start:end].transpose(0, 1))
    return out


class ChunkWriter:
    """One daemon thread putting chunks; at most ``depth`` jobs wait.

    Invariants: every accepted job is finished (stored, refused or failed)
    exactly once and counted; :meth:`flush` returns only when every job
    accepted before it is finished; a full queue pushes back on
    :meth:`submit` for at most ``timeout_s``, then the job is dropped and
    counted, so a slow store never stalls a request for longer.
    """

    def __init__(self, backend: HFBackend, dtype: torch.dtype, depth: int = 8, timeout_s: float = 5.0) -> None:
        if depth < 1:
            raise InvalidInput(f"queue depth must be >= 1, got {depth}")
        if timeout_s < 0:
            raise InvalidInput(f"queue timeout must be >= 0, got {timeout_s}")
        self._backend = backend
        self._dtype = dtype
        self._timeout_s = timeout_s
        self._queue: queue.Queue[StoreJob | None] = queue.Queue(maxsize=depth)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("jobs", "stored", "refused", "dropped", "failed"), 0)
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="kvstore-hf-writer", daemon=True)
        self._thread.start()

    def submit(self, job: StoreJob) -> bool:
        """Queue a job; False if it was dropped (the queue stayed full, or the writer is closed)."""
        if self._closed:
            return False
        try:
            self._queue.put(job, timeout=self._timeout_s)
        except queue.Full:
            self._count("dropped")
            log.warning("store queue full for %.1f s: %d chunks not stored", self._timeout_s, len(job.keys))
            return False
        self._count("jobs")
        return True

    def flush(self) -> None:
        """Wait until every job accepted so far is finished."""
        self._queue.join()

    def close(self) -> None:
        """Finish the queued jobs and stop the thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def stats(self) -> WriterStats:
        with self._lock:
            c = dict(self._counts)
        return WriterStats(c["jobs"], c["stored"], c["refused"], c["dropped"], c["failed"], self._queue.unfinished_tasks)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._run(job)
            finally:
                self._queue.task_done()

    def _run(self, job: StoreJob) -> None:
        c = job.ns.chunk_tokens
        try:
            chunks = [
                layers_to_chunk(job.layers, (job.first_chunk + i) * c, (job.first_chunk + i + 1) * c, self._dtype)
                for i in range(len(job.keys))
            ]
            stored = self._backend.put_many(job.ns, job.keys, chunks)
        except Exception:
            log.exception("storing %d chunks failed", len(job.keys))
            self._count("failed")
            return
        self._count("stored", sum(stored))
        self._count("refused", len(stored) - sum(stored))
