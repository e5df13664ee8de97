"""Prefill/decode hand-off for the HF connector: the prefill side pushes KV while it computes.

The prefill side (:class:`PrefillPusher`) announces the prompt's chunk keys
to the decode side's daemon, then runs the prompt's prefill chunk by chunk
(chunked prefill at the namespace's ``chunk_tokens``); each full chunk's KV
is put into the decode side's daemon by a background thread as soon as the
chunk is computed, while the model computes the next one. A chunk whose
push fails is withdrawn at once; if the prefill itself fails, every chunk not
pushed yet is withdrawn, so the decode side's lookups stop waiting for them.

The decode side is an ordinary :class:`~kvstore.connectors.hf.HFConnector`
on its daemon whose ``config.lookup_wait_s`` is set: its lookup waits (up to
that bound) for the chunks announced and not yet stored, loads everything
that arrived, and computes the rest. Waiting never returns wrong KV: chunks
are served only once stored, by the ordinary checksummed path.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch

from kvstore.connectors.hf_writer import LayerKV, layers_to_chunk, snapshot
from kvstore.errors import InvalidInput, KVStoreError
from kvstore.keys import ChunkKey, Namespace, TokenInput, prefix_keys
from kvstore.models.kv import torch_dtype

if TYPE_CHECKING:
    from transformers import DynamicCache

    from kvstore.client import Client
    from kvstore.connectors.hf import HFConnector

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HandoffResult:
    """A prompt prefilled on this side and pushed to the decode side.

    Attributes:
        cache: the prompt's KV (every token), as a single-node chunked prefill leaves it.
        logits: next-token logits after the last prompt token.
        prompt_tokens: tokens in the prompt.
        announced: chunks the decode side said it now expects.
        pushed: keys of the chunks the decode side's daemon took, in order.
        failed: keys of the chunks not delivered (withdrawn).
        compute_s: time spent computing the prefill.
        seconds: wall time from the announcement to the last push's acknowledgement.
    """

    cache: DynamicCache
    logits: torch.Tensor
    prompt_tokens: int
    announced: int
    pushed: tuple[ChunkKey, ...]
    failed: tuple[ChunkKey, ...]
    compute_s: float
    seconds: float


@dataclass(frozen=True, slots=True)
class _Push:
    key: ChunkKey
    index: int
    layers: tuple[LayerKV, ...]


class _Pusher:
    """One thread putting computed chunks into the decode side's daemon, in order; withdraws what fails."""

    def __init__(self, target: Client, ns: Namespace, dtype: torch.dtype, depth: int) -> None:
        self._target, self._ns, self._dtype = target, ns, dtype
        self._queue: queue.Queue[_Push | None] = queue.Queue(maxsize=depth)
        self.pushed: list[ChunkKey] = []
        self.failed: list[ChunkKey] = []
        self._thread = threading.Thread(target=self._work, name="kvstore-hf-handoff", daemon=True)
        self._thread.start()

    def submit(self, job: _Push) -> None:
        self._queue.put(job)

    def finish(self) -> None:
        """Wait until every submitted chunk is pushed (or failed), then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            c = self._ns.chunk_tokens
            try:
                chunk = layers_to_chunk(job.layers, job.index * c, (job.index + 1) * c, self._dtype)
                ok = self._target.put_many(self._ns, [job.key], [chunk])[0]
            except (KVStoreError, OSError) as exc:
                log.warning("pushing chunk %d to the decode side failed: %s", job.index, exc)
                ok = False
            if ok:
                self.pushed.append(job.key)
            else:
                self.failed.append(job.key)
                withdraw(self._target, self._ns, [job.key])


def withdraw(target: Client, ns: Namespace, keys: list[ChunkKey]) -> None:
    """Best effort: the decode side stops expecting ``keys`` (an announcement also expires by itself)."""
    if not keys:
        return
    try:
        target.withdraw(ns, keys)
    except (KVStoreError, OSError) as exc:
        log.warning("withdrawing %d chunks from the decode side failed: %s", len(keys), exc)


class PrefillPusher:
    """The prefill side of a hand-off: chunked prefill with each chunk's KV pushed as it is computed.

    Invariants: every key announced is, by the time :meth:`prefill` returns
    or raises, either stored on the decode side or withdrawn; a chunk is pushed
    only under the key of exactly the tokens whose KV it holds; at most
    ``depth`` computed chunks wait for the pusher (then the compute waits).

    Args:
        connector: the prefill side's connector (its model and namespace; its own
            store receives the chunks too when ``store_local``).
        target: a client of the decode side's daemon (the namespace's tenant).
        ttl_s: how long the decode side expects the announced chunks.
        depth: computed chunks that may wait to be pushed.
        store_local: also store the chunks where the connector keeps its own.
    """

    def __init__(self, connector: HFConnector, target: Client, *, ttl_s: float = 60.0, depth: int = 4,
                 store_local: bool = True) -> None:
        if not ttl_s > 0 or depth < 1:
            raise InvalidInput(f"ttl_s must be > 0 and depth >= 1, got {ttl_s}, {depth}")
        self.connector, self.target = connector, target
        self.ttl_s, self.depth, self.store_local = ttl_s, depth, store_local
        self.ns = target.register(connector.ns)

    def prefill(self, ids: TokenInput) -> HandoffResult:
        """Announce, then prefill ``ids`` chunk by chunk, pushing every full chunk; see the class docstring.

        Raises:
            InvalidInput: bad ids; KVStoreError, OSError: the announcement failed (nothing was computed).
        """
        conn = self.connector
        tokens = conn.checked_tokens(ids)
        keys = prefix_keys(self.ns, tokens)
        t0 = time.perf_counter()
        announced = self.target.announce(self.ns, keys, self.ttl_s) if keys else 0
        pusher = _Pusher(self.target, self.ns, torch_dtype(self.ns.spec.dtype), self.depth)
        submitted = 0
        try:
            cache, logits, compute_s = self._compute(tokens, keys, pusher)
            submitted = len(keys)
        finally:
            pusher.finish()
            if submitted < len(keys):  # the compute failed: what was never submitted will not come
                pending = keys[len(pusher.pushed) + len(pusher.failed) :]
                withdraw(self.target, self.ns, pending)
        if self.store_local:
            conn.store_chunks(keys, 0, len(keys), cache)
        return HandoffResult(cache, logits, int(tokens.size), announced, tuple(pusher.pushed),
                             tuple(pusher.failed), compute_s, time.perf_counter() - t0)

    def _compute(self, tokens: npt.NDArray[np.uint32], keys: list[ChunkKey],
                 pusher: _Pusher) -> tuple[DynamicCache, torch.Tensor, float]:
        from transformers import DynamicCache

        conn, c = self.connector, self.ns.chunk_tokens
        cache = DynamicCache(config=conn.model.config)
        compute_s, logits = 0.0, None
        for start in range(0, int(tokens.size), c):
            t = time.perf_counter()
            logits = conn.forward(tokens[start : start + c], cache)
            compute_s += time.perf_counter() - t
            index = start // c
            if index < len(keys):
                pusher.submit(_Push(keys[index], index, snapshot(cache)))
        assert logits is not None  # checked_tokens refuses an empty prompt
        return cache, logits, compute_s
