"""The background writer: copies chunks to lower tiers through a bounded queue.

Jobs are bounded in number; a full queue pushes back on the producer (it
waits up to a timeout, then the job is dropped and counted). A write-through
job pins its source chunk in the top tier when queued and unpins it after
the write, so the chunk cannot be evicted before it reaches the lower tiers.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from kvstore.buffers import U8
from kvstore.keys import ChunkKey
from kvstore.tiers.base import ChunkMeta, Tier
from kvstore.tiers.memory import MemoryTier

log = logging.getLogger(__name__)

Stored = Callable[[ChunkKey, ChunkMeta, int], None]
"""Called after a job stored a chunk in the store's tier number ``int``."""

Prepare = Callable[[ChunkKey, ChunkMeta, int, U8, bool], "tuple[U8, ChunkMeta] | None"]
"""Turns a chunk's bytes (raw, or a codec container when the flag is set) into what
tier number ``int`` stores (e.g. a codec container) and its meta; None to skip that tier."""


@dataclass(slots=True)
class WriteJob:
    """Write ``key`` to ``targets`` (store tier indices).

    The bytes come from ``data`` when the job owns a copy (write-back
    demotion, a container stored as it arrived), else from a pinned view of
    ``source`` (write-through). ``encoded``: the bytes are a codec container
    (an encoded tier's), not raw KV.
    """

    key: ChunkKey
    meta: ChunkMeta
    targets: list[int]
    data: U8 | None = None
    source: MemoryTier | None = None
    encoded: bool = False


@dataclass(slots=True)
class WriterStats:
    queued: int = 0
    written: int = 0
    dropped: int = 0
    failed: int = 0
    depth: int = 0


@dataclass(slots=True)
class _Stop:
    done: threading.Event = field(default_factory=threading.Event)


class BackgroundWriter:
    """One thread draining a bounded queue of write jobs into lower tiers."""

    def __init__(
        self, tiers: list[Tier], on_stored: Stored, depth: int, put_timeout_s: float, prepare: Prepare
    ) -> None:
        self._tiers = tiers
        self._on_stored = on_stored
        self._prepare = prepare
        self._timeout = put_timeout_s
        self._queue: queue.Queue[WriteJob | _Stop] = queue.Queue(maxsize=depth)
        self._stats = WriterStats()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="kvstore-writer", daemon=True)
        self._thread.start()
        self._closed = False

    def submit(self, job: WriteJob, block: bool = True) -> bool:
        """Queue a job; False (counted as dropped, pins given back) if the queue stays full."""
        if job.source is not None and not job.source.pin(job.key):
            return False  # already evicted from the top tier
        try:
            self._queue.put(job, block=block, timeout=self._timeout if block else None)
        except queue.Full:
            self._finish(job)
            with self._lock:
                self._stats.dropped += 1
            log.warning("background write queue full: dropped a lower-tier write")
            return False
        with self._lock:
            self._stats.queued += 1
        return True

    def flush(self) -> None:
        """Wait until every queued job has run."""
        self._queue.join()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the queue to drain; True if it did."""
        deadline = time.monotonic() + timeout_s
        cond = self._queue.all_tasks_done
        with cond:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                cond.wait(left)
        return True

    @property
    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def stats(self) -> WriterStats:
        with self._lock:
            s = WriterStats(**{f: getattr(self._stats, f) for f in WriterStats.__slots__})
        s.depth = self._queue.qsize()
        return s

    def close(self) -> None:
        """Finish queued jobs, then stop the thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_Stop())
        self._thread.join()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if isinstance(job, _Stop):
                    return
                self._write(job)
            finally:
                self._queue.task_done()

    def _write(self, job: WriteJob) -> None:
        try:
            data = job.data if job.data is not None else (job.source.view(job.key) if job.source else None)
            if data is not None and job.source is not None and not job.meta.checksum:
                job.meta = replace(job.meta, checksum=job.source.checksum(job.key))  # a lazy put's checksum
            if data is None:
                with self._lock:
                    self._stats.dropped += 1
                return
            for index in job.targets:
                tier = self._tiers[index]
                try:
                    prepared = self._prepare(job.key, job.meta, index, data, job.encoded)
                    stored = prepared is not None and tier.put(job.key, prepared[0], prepared[1])
                except Exception:  # a failing tier or codec must not stop the writer
                    log.exception("background write to tier %s failed", tier.name)
                    with self._lock:
                        self._stats.failed += 1
                    continue
                if stored:
                    self._on_stored(job.key, job.meta, index)
            with self._lock:
                self._stats.written += 1
        finally:
            self._finish(job)

    @staticmethod
    def _finish(job: WriteJob) -> None:
        if job.source is not None:
            job.source.unpin(job.key)
