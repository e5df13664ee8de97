"""Prefix reuse for a HuggingFace transformers causal LM: :class:`HFConnector`.

Each request (a sequence of token ids) goes through four steps:

1. **keys**: the chained prefix key of every full chunk of its tokens
   (``kvstore.keys.prefix_keys``; a partial last chunk is never keyed);
2. **lookup**: the longest run of those chunks the store holds, pinned
   under a lease (an in-process ``TieredStore`` or the daemon);
3. **load + prefill**: the leading chunks are read, put into a transformers
   ``DynamicCache``, and only the remaining tokens go through the model (at
   least one always does: the first token's logits need it);
4. **store**: the chunks this request computed are put in the background
   (:mod:`kvstore.connectors.hf_writer`), off the request's path.

:meth:`HFConnector.generate` decodes on top and, unless told not to, stores
the KV of the reply's tokens too, so the next turn of a chat (whose prompt is
the whole history) reuses it. docs/connectors.md describes the guarantees.

RAG prompts: :meth:`HFConnector.generate_blended` reuses retrieved passages'
KV by content wherever they sit in the prompt (CacheBlend;
:mod:`kvstore.connectors.hf_blend`, docs/blend.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

import numpy as np
import numpy.typing as npt
import torch

from kvstore.blend.config import BlendConfig
from kvstore.connectors.hf_backend import HFBackend, PrefixHit, as_backend
from kvstore.connectors.hf_spec import check_namespace, model_and_spec
from kvstore.connectors.hf_writer import ChunkWriter, StoreJob, WriterStats, snapshot
from kvstore.errors import InvalidInput, KVStoreError, LeaseError
from kvstore.keys import ChunkKey, Namespace, TokenInput, as_token_array, prefix_keys
from kvstore.models.kv import chunks_to_cache, torch_dtype
from kvstore.models.smollm2 import LoadedModel
from kvstore.tiers.store import TieredStore

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel

    from kvstore.client import Client
    from kvstore.connectors.hf_blend import BlendedGeneration, PassageBlender
    from kvstore.connectors.hf_handoff import HandoffResult

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HFConnectorConfig:
    """How the connector stores and loads.

    Attributes:
        store_decode: in :meth:`HFConnector.generate`, also store the KV of the
            generated tokens (computed one token at a time; see docs/connectors.md).
        queue_depth: store jobs that may wait for the background writer.
        queue_timeout_s: how long a request waits for room in a full queue
            before its chunks are not stored (counted in ``stats().writer``).
        lease_ttl_s: lifetime of a lookup's lease; None for the store's default.
        compute_dtype: dtype of the ``DynamicCache`` handed to the model (the
            model's compute dtype; float32 on CPU).
        lookup_wait_s: a hand-off's decode side: a lookup waits up to this long for
            chunks a prefill side announced as on their way (through a daemon; 0: never
            waits). See :mod:`kvstore.connectors.hf_handoff` and docs/migration.md.
    """

    store_decode: bool = True
    queue_depth: int = 8
    queue_timeout_s: float = 5.0
    lease_ttl_s: float | None = None
    compute_dtype: torch.dtype = torch.float32
    lookup_wait_s: float = 0.0

    def __post_init__(self) -> None:
        if self.queue_depth < 1:
            raise InvalidInput(f"queue_depth must be >= 1, got {self.queue_depth}")
        if self.queue_timeout_s < 0:
            raise InvalidInput(f"queue_timeout_s must be >= 0, got {self.queue_timeout_s}")
        if self.lease_ttl_s is not None and self.lease_ttl_s <= 0:
            raise InvalidInput(f"lease_ttl_s must be > 0, got {self.lease_ttl_s}")
        if not 0 <= self.lookup_wait_s < float("inf"):
            raise InvalidInput(f"lookup_wait_s must be a finite number >= 0, got {self.lookup_wait_s}")
        if not self.compute_dtype.is_floating_point:
            raise InvalidInput(f"compute_dtype must be a float dtype, got {self.compute_dtype}")


@dataclass(frozen=True, slots=True)
class PrefillResult:
    """A prefilled request; unpacks as ``cache, logits, hit_tokens``.

    Attributes:
        cache: the request's KV, every prompt token (extend it by decoding).
        logits: next-token logits after the last prompt token, ``[vocab]``.
        hit_tokens: prompt tokens whose KV came from kvstore (not computed).
        prompt_tokens: tokens in the prompt.
        tiers: the tier each loaded chunk was read from (as the lookup saw it).
        seconds: wall time from the lookup to the logits.
    """

    cache: DynamicCache
    logits: torch.Tensor
    hit_tokens: int
    prompt_tokens: int
    tiers: tuple[str, ...]
    seconds: float

    def __iter__(self) -> Iterator[object]:
        return iter((self.cache, self.logits, self.hit_tokens))


@dataclass(frozen=True, slots=True)
class GenerateResult:
    """A generated reply.

    Attributes:
        tokens: the generated token ids (ending with an end-of-sequence id if one was produced).
        prompt_tokens: tokens in the prompt.
        hit_tokens: prompt tokens whose KV came from kvstore.
        ttft_s: time to the first token's logits (lookup, load, prefill).
        decode_s: time of the decode steps after it.
    """

    tokens: tuple[int, ...]
    prompt_tokens: int
    hit_tokens: int
    ttft_s: float
    decode_s: float


@dataclass(frozen=True, slots=True)
class ConnectorStats:
    """Counters since the connector was built.

    Attributes:
        requests: prefills run (each generate runs one).
        prompt_tokens: prompt tokens seen.
        hit_tokens: prompt tokens loaded instead of computed.
        lookup_chunks: chunks the lookups found.
        loaded_chunks: chunks read and used.
        lost_chunks: chunks found by a lookup but gone when read (evicted between
            the two); the prompt was computed from the first of them.
        backend_errors: lookups or reads that raised (the request was computed instead).
        writer: the background writer's counters.
    """

    requests: int
    prompt_tokens: int
    hit_tokens: int
    lookup_chunks: int
    loaded_chunks: int
    lost_chunks: int
    backend_errors: int
    writer: WriterStats

    @property
    def hit_rate(self) -> float:
        """Fraction of prompt tokens loaded instead of computed."""
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class HFConnector:
    """A causal LM whose prompts reuse KV kept in kvstore.

    Invariants: a chunk is stored only under the key of exactly the tokens
    whose KV it holds, computed by this model at those positions; every lease
    a lookup takes is consumed by reading or released before :meth:`prefill`
    returns, on every path; KV read back is used only up to the first chunk
    that is missing or has the wrong size, never past it; at most
    ``config.queue_depth`` store jobs wait.

    Not thread-safe: one connector serves one request at a time (build one
    per thread; they may share the store or client).
    """

    def __init__(
        self,
        model: LoadedModel | PreTrainedModel,
        where: TieredStore | Client | HFBackend,
        namespace: Namespace,
        config: HFConnectorConfig = HFConnectorConfig(),
    ) -> None:
        """Check the namespace against the model and register it.

        Args:
            model: the model (a ``LoadedModel`` also carries its fingerprint, which is checked).
            where: an in-process ``TieredStore``, a daemon ``Client`` or a backend.
            namespace: the namespace its KV lives in; its spec must describe this model's KV.
            config: see :class:`HFConnectorConfig`.
        Raises:
            NamespaceMismatch: the namespace's spec or scheme does not fit the model.
        """
        self.model, model_spec = model_and_spec(model)
        check_namespace(namespace, model_spec, self.model.config)
        self.config = config
        self.backend = as_backend(where)
        self.ns = self.backend.register(namespace)
        self._chunk_dtype = torch_dtype(self.ns.spec.dtype)
        self._chunk_nbytes = self.ns.chunk_nbytes
        self._writer = ChunkWriter(self.backend, self._chunk_dtype, config.queue_depth, config.queue_timeout_s)
        self._counts = dict.fromkeys(("requests", "prompt", "hit", "found", "loaded", "lost", "errors"), 0)
        self._blenders: dict[BlendConfig, PassageBlender] = {}

    # -- requests --------------------------------------------------------------------------
    def prefill(self, ids: TokenInput) -> PrefillResult:
        """Load the longest cached prefix of ``ids``, compute the rest, queue the new chunks for storing.

        Raises:
            InvalidInput: empty or bad token ids, or more than the model's positions.
        """
        t0 = time.perf_counter()
        tokens = self._tokens(ids, extra=0)
        keys = prefix_keys(self.ns, tokens)
        chunks, tiers = self._load(keys)
        use = min(len(chunks) * self.ns.chunk_tokens, tokens.size - 1)  # one token at least is computed
        cache = self._cache(chunks, use)
        logits = self._forward(tokens[use:], cache)
        self._store(keys, len(chunks), tokens.size // self.ns.chunk_tokens, cache)
        self._count(requests=1, prompt=int(tokens.size), hit=use)
        return PrefillResult(cache, logits, use, int(tokens.size), tiers, time.perf_counter() - t0)

    def generate(
        self,
        ids: TokenInput,
        max_new_tokens: int,
        greedy: bool = True,
        *,
        eos_token_ids: Sequence[int] | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> GenerateResult:
        """Prefill ``ids`` (see :meth:`prefill`), then decode up to ``max_new_tokens`` tokens.

        With ``config.store_decode`` the full chunks of prompt + reply whose KV
        the cache holds (every token but the last generated one, which was never
        fed) are stored when decoding ends.

        Args:
            ids: the prompt's token ids.
            max_new_tokens: the most tokens to generate (>= 1).
            greedy: take the most likely token; otherwise sample at ``temperature``.
            eos_token_ids: stop after any of these (default: the model's generation config).
            temperature, generator: sampling temperature and random generator.
        Raises:
            InvalidInput: bad ids, ``max_new_tokens`` < 1, or prompt + reply longer than the model's positions.
        """
        if max_new_tokens < 1:
            raise InvalidInput(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not greedy and temperature <= 0:
            raise InvalidInput(f"temperature must be > 0, got {temperature}")
        tokens = self._tokens(ids, extra=max_new_tokens)
        stop = set(self._eos_ids() if eos_token_ids is None else eos_token_ids)
        first = self.prefill(tokens)
        t0 = time.perf_counter()
        cache, logits = first.cache, first.logits
        out: list[int] = []
        while True:
            token = _pick(logits, greedy, temperature, generator)
            out.append(token)
            if token in stop or len(out) == max_new_tokens:
                break
            logits = self._forward(np.asarray([token], dtype=np.uint32), cache)
        if self.config.store_decode:
            fed = np.concatenate([tokens, np.asarray(out[:-1], dtype=np.uint32)])
            c = self.ns.chunk_tokens
            self._store(prefix_keys(self.ns, fed), tokens.size // c, fed.size // c, cache)
        return GenerateResult(tuple(out), first.prompt_tokens, first.hit_tokens, first.seconds, time.perf_counter() - t0)

    # -- RAG prompts: blended passage KV (docs/blend.md) -----------------------------------
    def blender(self, config: BlendConfig | None = None) -> PassageBlender:
        """The passage blender of this connector's store for ``config`` (default ``BlendConfig()``), made once.

        Raises:
            InvalidInput: the model is not Llama-architecture; see :class:`kvstore.blend.blender.Blender`.
        """
        config = config or BlendConfig()
        if config not in self._blenders:
            from kvstore.connectors.hf_blend import PassageBlender

            self._blenders[config] = PassageBlender(self, config)
        return self._blenders[config]

    def generate_blended(
        self,
        passages: Sequence[TokenInput],
        question: TokenInput,
        max_new_tokens: int,
        *,
        head: TokenInput = (),
        config: BlendConfig | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ) -> BlendedGeneration:
        """Greedy reply to ``head + passages + question``, each passage's KV reused from the store by content.

        A passage seen before (in any prompt, at any position) is read back by
        its content key; one never seen is computed on its own and stored.
        ``config.ratio`` of the passage tokens are recomputed (default 0.15);
        the head and the question always are. See
        :class:`kvstore.connectors.hf_blend.PassageBlender`.

        Raises:
            InvalidInput: a passage shorter than ``config.min_passage_tokens``, bad ids,
                ``max_new_tokens`` < 1, or more tokens than the model's positions.
        """
        return self.blender(config).generate(passages, question, max_new_tokens, head=head,
                                             eos_token_ids=eos_token_ids)

    # -- prefill/decode hand-off (kvstore.connectors.hf_handoff) ------------------------------
    def prefill_and_push(self, ids: TokenInput, target: Client, *, ttl_s: float = 60.0) -> HandoffResult:
        """Prefill ``ids`` chunk by chunk, pushing each full chunk's KV to ``target`` (the decode side's
        daemon) as soon as it is computed; see :class:`kvstore.connectors.hf_handoff.PrefillPusher`."""
        from kvstore.connectors.hf_handoff import PrefillPusher

        return PrefillPusher(self, target, ttl_s=ttl_s).prefill(ids)

    def checked_tokens(self, ids: TokenInput, extra: int = 0) -> npt.NDArray[np.uint32]:
        """``ids`` as token ids, checked against the model (positions for ``extra`` more, vocabulary).

        Raises:
            InvalidInput: empty or bad ids, or more than the model's positions.
        """
        return self._tokens(ids, extra)

    def forward(self, tokens: npt.NDArray[np.uint32], cache: DynamicCache) -> torch.Tensor:
        """Run ``tokens`` after what ``cache`` holds (extending it); the last position's logits."""
        return self._forward(tokens, cache)

    def store_chunks(self, keys: list[ChunkKey], start: int, end: int, cache: DynamicCache) -> None:
        """Queue chunks ``[start, end)`` of ``cache`` for storing (in the background) under ``keys[start:end]``."""
        self._store(keys, start, end, cache)

    # -- lifecycle -------------------------------------------------------------------------
    def flush(self) -> None:
        """Wait until every queued chunk is stored (and, in-process, written to the lower tiers)."""
        self._writer.flush()
        self.backend.flush()

    def close(self) -> None:
        """Store what is queued and stop the writer; the store or client stays open (the caller owns it)."""
        self._writer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> ConnectorStats:
        """The counters so far (a snapshot)."""
        c = self._counts
        return ConnectorStats(
            c["requests"], c["prompt"], c["hit"], c["found"], c["loaded"], c["lost"], c["errors"], self._writer.stats()
        )

    # -- steps -----------------------------------------------------------------------------
    def _tokens(self, ids: TokenInput, extra: int) -> npt.NDArray[np.uint32]:
        arr = as_token_array(ids)
        if arr.size == 0:
            raise InvalidInput("a request needs at least one token")
        limit = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        if limit and arr.size + extra > limit:
            raise InvalidInput(f"{arr.size} prompt + {extra} new tokens exceed the model's {limit} positions")
        vocab = int(getattr(self.model.config, "vocab_size", 0) or 0)
        if vocab and int(arr.max()) >= vocab:
            raise InvalidInput(f"token id {int(arr.max())} is outside the model's vocabulary of {vocab}")
        return arr

    def _load(self, keys: list[ChunkKey]) -> tuple[list[torch.Tensor], tuple[str, ...]]:
        """The leading chunks of ``keys`` the backend holds, read under a lease; [] on any backend error."""
        if not keys:
            return [], ()
        wait_s, ttl_s = self.config.lookup_wait_s, self.config.lease_ttl_s
        try:
            if wait_s > 0:
                hit = self.backend.lookup_waiting(self.ns, keys, ttl_s, wait_s)
            else:
                hit = self.backend.lookup(self.ns, keys, ttl_s)
        except (KVStoreError, OSError) as exc:
            log.warning("kvstore lookup failed, computing the whole prompt: %s", exc)
            self._count(errors=1)
            return [], ()
        self._count(found=hit.chunks)
        if not hit.keys:
            return [], ()
        chunks = self._read(hit, keys)
        self._count(loaded=len(chunks), lost=hit.chunks - len(chunks))
        return chunks, hit.tiers[: len(chunks)]

    def _read(self, hit: PrefixHit, keys: list[ChunkKey]) -> list[torch.Tensor]:
        """Read the hit chunks; keep the leading ones that arrived whole. Always gives the lease back."""
        n = hit.chunks
        if tuple(keys[:n]) != hit.keys:  # a backend answering for other keys: trust nothing
            self._release(hit.lease)
            return []
        shape = self.ns.spec.chunk_shape(self.ns.chunk_tokens)
        outs = [torch.empty(shape, dtype=self._chunk_dtype) for _ in range(n)]
        good = 0
        try:
            sizes = self._get(hit, outs)
            while good < n and sizes[good] == self._chunk_nbytes:
                good += 1
        except (KVStoreError, OSError) as exc:
            log.warning("kvstore read failed, computing the whole prompt: %s", exc)
            self._count(errors=1)
            good = 0
        finally:
            if good < n:  # a miss or an error left pins behind: give them back
                self._release(hit.lease)
        return outs[:good]

    def _get(self, hit: PrefixHit, outs: list[torch.Tensor]) -> list[int | None]:
        try:
            return self.backend.get_many(self.ns, hit.keys, outs, hit.lease)
        except LeaseError:  # it ran out before the read (a daemon says so; a store just reads): read unpinned
            return self.backend.get_many(self.ns, hit.keys, outs, None)

    def _release(self, lease: int | None) -> None:
        if lease is None:
            return
        try:
            self.backend.release(lease)
        except (KVStoreError, OSError) as exc:  # it expires by itself
            log.warning("releasing lease %s failed: %s", lease, exc)

    def _cache(self, chunks: list[torch.Tensor], use: int) -> DynamicCache:
        """A cache holding the first ``use`` tokens of ``chunks`` (an empty one for none)."""
        from transformers import DynamicCache

        if use == 0:
            return DynamicCache(config=self.model.config)
        c = self.ns.chunk_tokens
        need = -(-use // c)
        parts = chunks[:need]
        if use < need * c:
            parts[-1] = parts[-1][:, :, : use - (need - 1) * c]
        return chunks_to_cache(parts, config=self.model.config, dtype=self.config.compute_dtype)

    def _forward(self, tokens: npt.NDArray[np.uint32], cache: DynamicCache) -> torch.Tensor:
        """Run ``tokens`` after what ``cache`` holds (extending it); the last position's logits."""
        ids = torch.from_numpy(tokens.astype(np.int64)).reshape(1, -1)
        with torch.inference_mode():
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits: torch.Tensor = out.logits[0, -1]
        return logits

    def _store(self, keys: list[ChunkKey], start: int, end: int, cache: DynamicCache) -> None:
        """Queue chunks ``[start, end)`` of ``cache`` for storing under ``keys[start:end]``."""
        if end <= start:
            return
        self._writer.submit(StoreJob(self.ns, tuple(keys[start:end]), start, snapshot(cache)))

    def _eos_ids(self) -> list[int]:
        config = getattr(self.model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        if eos is None:
            return []
        return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]

    def _count(self, **deltas: int) -> None:
        for name, value in deltas.items():
            self._counts[name] += value


def _pick(logits: torch.Tensor, greedy: bool, temperature: float, generator: torch.Generator | None) -> int:
    if greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
