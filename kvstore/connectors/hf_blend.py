"""RAG prompts through the HuggingFace connector: reused passage KV blended in (CacheBlend).

:class:`PassageBlender` serves prompts made of retrieved passages and a
question. Each passage's KV is computed **on its own** (positions ``0 ..``)
the first time it is seen and kept in the connector's store -- an in-process
``TieredStore`` (through its chunk-cache index) or the daemon (a plain chunk)
-- under the content key of its tokens (``kvstore.keys.content_key``). A later
prompt that retrieves the same passage, at any position and in any order,
reads that KV back and :class:`kvstore.blend.blender.Blender` moves it to its
new positions and recomputes the share of tokens ``BlendConfig.ratio`` asks
for; the head (instructions) and the question are always computed.

Blended KV is an approximation of the prompt's true KV, so nothing of a
blended prompt is stored under prefix keys (the connector's invariant: a
prefix chunk holds exactly the KV a full prefill computes). Store failures are
logged and the passage is computed instead; the request still succeeds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvstore.blend.blender import Blender, BlendResult
from kvstore.blend.config import BlendConfig
from kvstore.blend.passages import compute_passage_kv
from kvstore.blend.segments import PassageKV, Segment
from kvstore.errors import InvalidInput, KVStoreError
from kvstore.keys import TokenInput, as_token_array
from kvstore.models.kv import torch_dtype

if TYPE_CHECKING:
    from transformers import DynamicCache

    from kvstore.connectors.hf import HFConnector

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BlendedPrefill:
    """A blended prompt.

    Attributes:
        cache: the prompt's KV (decode from it).
        logits: next-token logits after the last prompt token, ``[vocab]``.
        result: the blender's output (which tokens were reused, which recomputed).
        passage_hits: for each passage, whether its KV came from the store (else computed and stored now).
        stored_tokens: passage tokens whose KV was read from the store.
        prompt_tokens: tokens in the prompt.
        seconds: wall time from the store lookup to the logits.
    """

    cache: DynamicCache
    logits: torch.Tensor
    result: BlendResult
    passage_hits: tuple[bool, ...]
    stored_tokens: int
    prompt_tokens: int
    seconds: float


@dataclass(frozen=True, slots=True)
class BlendedGeneration:
    """A reply to a blended prompt.

    Attributes:
        tokens: the generated ids (ending with an end-of-sequence id if one was produced).
        prompt_tokens: tokens in the prompt.
        passage_hits: per passage, whether its KV came from the store.
        stored_tokens: passage tokens whose KV was read from the store.
        recomputed_fraction: share of the reused (passage) tokens recomputed through the last layer.
        ttft_s: time to the first token's logits (store reads, passage compute on a miss, blend).
        decode_s: time of the decode steps after it.
    """

    tokens: tuple[int, ...]
    prompt_tokens: int
    passage_hits: tuple[bool, ...]
    stored_tokens: int
    recomputed_fraction: float
    ttft_s: float
    decode_s: float


class PassageBlender:
    """Blends stored passage KV into RAG prompts for one :class:`~kvstore.connectors.hf.HFConnector`.

    Invariants: passage KV is stored in the connector's namespace (its spec's
    dtype) under the content key of exactly its tokens, computed on its own at
    positions ``0 ..``; a read whose size is not that passage's is treated as a
    miss. Not thread-safe (like the connector).
    """

    def __init__(self, connector: HFConnector, config: BlendConfig | None = None) -> None:
        """Raises InvalidInput (not a Llama model), ShapeMismatch or RopeScalingUnsupported (see Blender)."""
        self.connector = connector
        self.blender = Blender(connector.model, config or BlendConfig(), spec=connector.ns.spec)
        self._dtype = torch_dtype(connector.ns.spec.dtype)

    @property
    def config(self) -> BlendConfig:
        return self.blender.config

    # -- passages ----------------------------------------------------------------------------
    def passages(self, passages: Sequence[TokenInput]) -> tuple[list[PassageKV], tuple[bool, ...]]:
        """Each passage's KV: read from the store, or computed on its own and stored; and which were hits.

        Raises:
            InvalidInput: a passage with no tokens, fewer than ``min_passage_tokens``, or ids
                outside the model's vocabulary.
        """
        lists = [self._ids(p) for p in passages]
        short = [len(ids) for ids in lists if len(ids) < self.config.min_passage_tokens]
        if short:
            raise InvalidInput(
                f"a passage of {short[0]} tokens is shorter than min_passage_tokens={self.config.min_passage_tokens}; "
                "put short text in the head or the question"
            )
        found = self._read(lists)
        out: list[PassageKV] = []
        for ids, hit in zip(lists, found):
            if hit is None:
                hit = self.store_passage(ids)
            out.append(hit)
        return out, tuple(f is not None for f in found)

    def store_passage(self, tokens: TokenInput) -> PassageKV:
        """Compute a passage's KV on its own and store it (a store error is logged); returns it as stored."""
        ids = self._ids(tokens)
        p = compute_passage_kv(self.connector.model, ids)
        data = p.kv.to(self._dtype).contiguous()
        try:
            if not self.connector.backend.put_passage(self.connector.ns, ids, data):
                log.warning("the store did not take a passage of %d tokens", len(ids))
        except (KVStoreError, OSError) as exc:
            log.warning("storing a passage failed, it will be computed again next time: %s", exc)
        return PassageKV(p.tokens, data.float(), 0)

    def _read(self, lists: list[list[int]]) -> list[PassageKV | None]:
        spec, ns = self.connector.ns.spec, self.connector.ns
        outs = [torch.empty(spec.chunk_shape(len(ids)), dtype=self._dtype) for ids in lists]
        try:
            hits = self.connector.backend.get_passages(ns, lists, outs) if lists else []
        except (KVStoreError, OSError) as exc:
            log.warning("reading passages failed, computing them: %s", exc)
            return [None] * len(lists)
        found: list[PassageKV | None] = []
        for ids, out, hit in zip(lists, outs, hits, strict=True):
            ok = hit is not None and hit.nbytes == spec.chunk_nbytes(len(ids))
            found.append(PassageKV(tuple(ids), out.float(), hit.start_position) if ok and hit else None)
        return found

    # -- requests ----------------------------------------------------------------------------
    def prefill(
        self, passages: Sequence[TokenInput], question: TokenInput, head: TokenInput = ()
    ) -> BlendedPrefill:
        """Blend ``head + passages + question``: passage KV from the store (computed and stored on a miss).

        Args:
            passages: each retrieved passage's token ids (at least ``config.min_passage_tokens`` each).
            question: token ids after the passages (the question and the assistant turn's opening).
            head: token ids before the passages (e.g. the chat template's system turn); computed.
        Raises:
            InvalidInput: no tokens, a short passage, bad ids, or more tokens than the model's positions.
        """
        t0 = time.perf_counter()
        kvs, hits = self.passages(passages)
        segs: list[Segment] = [self._ids(head, empty=True), *kvs, self._ids(question, empty=True)]
        result = self.blender.blend([s for s in segs if isinstance(s, PassageKV) or len(s)])
        cache = result.cache(self.connector.model.config)
        stored = sum(len(kv) for kv, hit in zip(kvs, hits) if hit)
        return BlendedPrefill(
            cache, result.logits, result, hits, stored, int(result.ids.numel()), time.perf_counter() - t0
        )

    def generate(
        self,
        passages: Sequence[TokenInput],
        question: TokenInput,
        max_new_tokens: int,
        *,
        head: TokenInput = (),
        eos_token_ids: Sequence[int] | None = None,
    ) -> BlendedGeneration:
        """:meth:`prefill`, then greedy decoding of up to ``max_new_tokens`` tokens from the blended cache.

        Raises:
            InvalidInput: as :meth:`prefill`, ``max_new_tokens`` < 1, or prompt + reply past the model's positions.
        """
        if max_new_tokens < 1:
            raise InvalidInput(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        conn = self.connector
        first = self.prefill(passages, question, head)
        limit = int(getattr(conn.model.config, "max_position_embeddings", 0) or 0)
        if limit and first.prompt_tokens + max_new_tokens > limit:
            raise InvalidInput(f"{first.prompt_tokens} prompt + {max_new_tokens} new tokens exceed {limit} positions")
        stop = set(conn._eos_ids() if eos_token_ids is None else eos_token_ids)
        t0 = time.perf_counter()
        logits, out = first.logits, []
        while True:
            token = int(torch.argmax(logits))
            out.append(token)
            if token in stop or len(out) == max_new_tokens:
                break
            logits = conn._forward(np.asarray([token], dtype=np.uint32), first.cache)
        res = first.result
        return BlendedGeneration(
            tuple(out), first.prompt_tokens, first.passage_hits, first.stored_tokens, res.recomputed_reused_fraction,
            first.seconds, time.perf_counter() - t0,
        )

    def _ids(self, tokens: TokenInput, empty: bool = False) -> list[int]:
        arr = as_token_array(tokens)
        if arr.size == 0 and not empty:
            raise InvalidInput("a passage needs at least one token")
        vocab = int(getattr(self.connector.model.config, "vocab_size", 0) or 0)
        if arr.size and vocab and int(arr.max()) >= vocab:
            raise InvalidInput(f"token id {int(arr.max())} is outside the model's vocabulary of {vocab}")
        return [int(t) for t in arr]
