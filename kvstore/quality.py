"""Quality harness: how much a KV transformation changes what the model predicts.

Every lossy feature (quantizing codecs, blending, partial recomputation)
reports against the same model with its own uncompressed KV. The harness
prefills a context once, keeps its KV in chunk layout (float32), and runs the
continuation teacher-forced on top of

- the reference KV, once, when the harness is built, and
- each test KV (``transform(reference_kv)`` or a KV built some other way).

Definitions (natural log; ``c`` is the continuation, ``C = len(c)``):

- scored positions: ``i = 0 .. C-2``; input ``c[i]`` after the context and
  ``c[:i]``, target ``c[i+1]`` (``C - 1`` positions). Inputs and positions
  are identical in both runs; only the context's KV differs.
- ``kl_mean``: mean over scored positions of ``KL(P_ref || P_test) =
  sum_v P_ref(v) (log P_ref(v) - log P_test(v))`` over the full vocabulary;
  ``kl_max`` is the largest per-position value.
- ``top1_agreement``: fraction of scored positions where both argmaxes agree.
- ``ppl_reference`` / ``ppl_test``: ``exp(mean_i -log P(c[i+1]))``;
  ``ppl_delta = ppl_test - ppl_reference``.
- ``greedy_match``: the reference greedily generates ``g_1..g_M`` after the
  context and ``c[0]``; both KVs then run teacher-forced over ``c[0], g_1 ..
  g_{M-1}`` and ``greedy_match`` counts the leading positions whose argmaxes
  agree (``M`` when all do). While they agree the inputs are exactly what free
  greedy decoding with the test KV would feed, so this is the length of the
  exact-match prefix of greedy generation, in one forward pass.

Recommended sizes for reported numbers: context >= 2048 tokens, continuation
>= 256; tests use shorter ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from kvstore.errors import InvalidInput, ShapeMismatch
from kvstore.models.kv import cache_to_chunk, chunks_to_cache
from kvstore.models.smollm2 import LoadedModel

if TYPE_CHECKING:
    from transformers import DynamicCache

#: maps the context's chunk-layout KV ``[layers, 2, tokens, kv_heads, head_dim]`` (float32) to a test KV
KVTransform = Callable[[torch.Tensor], torch.Tensor]

RECOMMENDED_CONTEXT_TOKENS = 2048
RECOMMENDED_CONTINUATION_TOKENS = 256


@dataclass(frozen=True, slots=True)
class QualityReport:
    """One test KV measured against the reference KV (definitions in the module docstring)."""

    context_tokens: int
    scored_positions: int
    kl_mean: float
    kl_max: float
    top1_agreement: float
    ppl_reference: float
    ppl_test: float
    greedy_tokens: int
    greedy_match: int

    @property
    def ppl_delta(self) -> float:
        return self.ppl_test - self.ppl_reference

    def to_dict(self) -> dict[str, float | int]:
        """Every field plus ``ppl_delta``, for JSON reports."""
        out: dict[str, float | int] = asdict(self)
        out["ppl_delta"] = self.ppl_delta
        return out

    def summary(self) -> str:
        return (
            f"KL {self.kl_mean:.3g} (max {self.kl_max:.3g}), top-1 {self.top1_agreement:.1%}, "
            f"ppl {self.ppl_reference:.3f} -> {self.ppl_test:.3f} ({self.ppl_delta:+.3g}), "
            f"greedy match {self.greedy_match}/{self.greedy_tokens}"
        )


@dataclass(frozen=True, slots=True)
class _Scores:
    """Log-probabilities over the scored positions and argmaxes over the greedy probe."""

    logprobs: torch.Tensor  # [C-1, vocab] float64
    greedy_argmax: torch.Tensor  # [M] int64


class QualityHarness:
    """Reference run of one (context, continuation) pair, reused for every test KV.

    Invariants: ``reference_kv`` is never modified (transforms get a copy);
    the reference and every test run use the same inputs, positions and code
    path, so the identity transform scores KL 0, top-1 1.0 and a full greedy match.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        context: Sequence[int],
        continuation: Sequence[int],
        *,
        greedy_tokens: int = 32,
    ) -> None:
        """Prefill the context and score the reference.

        Args:
            loaded: the model (computes in float32).
            context: token ids whose KV is transformed (>= 1; use >= 2048 for reports).
            continuation: token ids scored teacher-forced (>= 2; use >= 256 for reports).
            greedy_tokens: length ``M`` of the greedy probe (0 disables it).
        Raises:
            InvalidInput: sequences too short, or longer than the model's positions.
        """
        if len(context) < 1 or len(continuation) < 2 or greedy_tokens < 0:
            raise InvalidInput("need >= 1 context token, >= 2 continuation tokens, greedy_tokens >= 0")
        longest = len(context) + max(len(continuation), greedy_tokens + 1)
        if longest > loaded.max_positions:
            raise InvalidInput(f"{longest} tokens exceed the model's {loaded.max_positions} positions")
        self.loaded = loaded
        self.context = [int(t) for t in context]
        self.continuation = [int(t) for t in continuation]
        self.greedy_tokens = greedy_tokens
        self.reference_kv = self._prefill()
        self.greedy_inputs = self._greedy_reference()
        self._reference = self._score(self.reference_kv)

    def evaluate(self, transform: KVTransform) -> QualityReport:
        """Score ``transform(copy of reference_kv)`` against the reference.

        Raises:
            ShapeMismatch: the transform changed the KV's shape.
        """
        return self.evaluate_kv(transform(self.reference_kv.clone()))

    def evaluate_kv(self, kv: torch.Tensor) -> QualityReport:
        """Score a context KV built any way (e.g. blended) against the reference.

        Args:
            kv: ``[layers, 2, context_tokens, kv_heads, head_dim]``, any float dtype
                (cast to float32 for the forward pass).
        Raises:
            ShapeMismatch: ``kv`` does not have the reference's shape.
        """
        if kv.shape != self.reference_kv.shape:
            raise ShapeMismatch(
                f"test KV has shape {tuple(kv.shape)}, expected {tuple(self.reference_kv.shape)}"
            )
        targets = torch.tensor(self.continuation[1:], dtype=torch.long)
        return _compare(self._reference, self._score(kv), targets, len(self.context))

    @property
    def _device(self) -> torch.device:
        return next(self.loaded.model.parameters()).device

    def _ids(self, tokens: Sequence[int]) -> torch.Tensor:
        return torch.tensor([list(tokens)], dtype=torch.long, device=self._device)

    def _cache(self, kv: torch.Tensor) -> DynamicCache:
        return chunks_to_cache(
            [kv], config=self.loaded.model.config, dtype=torch.float32, device=self._device
        )

    def _forward(self, kv: torch.Tensor, inputs: Sequence[int]) -> torch.Tensor:
        """Logits ``[len(inputs), vocab]`` (CPU, float32) of ``inputs`` run on top of context KV ``kv``."""
        with torch.inference_mode():
            out = self.loaded.model(
                input_ids=self._ids(inputs), past_key_values=self._cache(kv), use_cache=True
            )
        logits: torch.Tensor = out.logits[0]
        return logits.float().cpu()

    def _prefill(self) -> torch.Tensor:
        """The context's KV in chunk layout, float32, on the CPU."""
        with torch.inference_mode():
            out = self.loaded.model(input_ids=self._ids(self.context), use_cache=True, logits_to_keep=1)
        return cache_to_chunk(out.past_key_values, dtype=torch.float32).cpu()

    def _greedy_reference(self) -> list[int]:
        """``c[0], g_1 .. g_{M-1}``: the probe's inputs, decoded greedily with the reference KV."""
        cache = self._cache(self.reference_kv)
        inputs = [self.continuation[0]]
        with torch.inference_mode():
            for _ in range(self.greedy_tokens - 1):
                out = self.loaded.model(
                    input_ids=self._ids(inputs[-1:]), past_key_values=cache, use_cache=True
                )
                inputs.append(int(out.logits[0, -1].argmax()))
        return inputs

    def _score(self, kv: torch.Tensor) -> _Scores:
        logits = self._forward(kv, self.continuation[:-1])
        if self.greedy_tokens:
            greedy = self._forward(kv, self.greedy_inputs).argmax(dim=-1)
        else:
            greedy = torch.empty(0, dtype=torch.long)
        return _Scores(torch.log_softmax(logits.double(), dim=-1), greedy)


def measure_quality(
    loaded: LoadedModel,
    context: Sequence[int],
    continuation: Sequence[int],
    transform: KVTransform,
    *,
    greedy_tokens: int = 32,
) -> QualityReport:
    """One-shot :class:`QualityHarness` run; build the harness yourself to test several transforms."""
    harness = QualityHarness(loaded, context, continuation, greedy_tokens=greedy_tokens)
    return harness.evaluate(transform)


def _compare(ref: _Scores, test: _Scores, targets: torch.Tensor, context_tokens: int) -> QualityReport:
    """Reduce two score sets to a report; ``ref`` and ``test`` cover the same positions."""
    greedy_tokens = int(ref.greedy_argmax.numel())
    kl = (ref.logprobs.exp() * (ref.logprobs - test.logprobs)).sum(dim=-1).clamp_min(0.0)
    agree = ref.logprobs.argmax(dim=-1) == test.logprobs.argmax(dim=-1)
    mismatches = (ref.greedy_argmax != test.greedy_argmax).nonzero()
    greedy_match = int(mismatches[0, 0]) if mismatches.numel() else greedy_tokens
    return QualityReport(
        context_tokens=context_tokens,
        scored_positions=int(kl.numel()),
        kl_mean=float(kl.mean()),
        kl_max=float(kl.max()),
        top1_agreement=float(agree.double().mean()),
        ppl_reference=_perplexity(ref.logprobs, targets),
        ppl_test=_perplexity(test.logprobs, targets),
        greedy_tokens=greedy_tokens,
        greedy_match=greedy_match,
    )


def _perplexity(logprobs: torch.Tensor, targets: torch.Tensor) -> float:
    """``exp`` of the mean negative log-likelihood of ``targets``."""
    nll = -logprobs.gather(1, targets.unsqueeze(1)).mean()
    return math.exp(float(nll))
