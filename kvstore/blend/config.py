"""The blender's one validated config object."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from kvstore.blend.select import DEVIATIONS
from kvstore.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class BlendConfig:
    """How much of the reused KV is recomputed, and where it is decided.

    Attributes:
        ratio: fraction of the reused (cached) tokens recomputed through the
            layers after the check layer, in [0, 1]. 0 is full reuse: only the
            uncached tokens are computed, at every layer, against the reused
            KV (no layer is computed in full). 1 recomputes everything (a full
            prefill, in this loop).
        check_layer: layers ``0 .. check_layer-1`` are computed in full (every
            token); at ``check_layer`` the reused tokens are ranked by how far
            their reused K/V lie from a fresh computation. >= 1.
        gradual: optional larger ratios applied at ``check_layer``,
            ``check_layer+1``, ... before ``ratio`` (CacheBlend's gradual
            filtering): each step keeps the most deviating tokens among the
            previous step's, so the schedule must not increase; a step below
            ``ratio`` counts as ``ratio``. Default ``(0.5, 0.3)``: layer
            ``check_layer`` keeps 50% of the reused tokens, the next layer 30%,
            the later layers ``ratio``.
        min_passage_tokens: passages shorter than this are refused (put short
            text among the uncached tokens instead).
        deviation: how reused tokens are ranked (``kvstore.blend.select``):
            ``"kv"``, ``"k"``, ``"v"`` or ``"kv_head_norm"``.
        influence: share of the ranking score taken from each token's influence
            (``kvstore.blend.influence``: how much its stale K/V move the
            uncached tokens' attention output at that layer); the rest from
            ``deviation`` x attention^``attention_weight``. Each part is scaled
            to mean 1 over the candidates. 0: deviation only; 1: influence only.
        sink_tokens: the first ``sink_tokens`` tokens of every passage are
            always recomputed, on top of the ``ratio`` share (each passage's
            opening was an attention sink in its standalone computation).
        per_passage: take the top ``ratio`` within each passage instead of
            over all reused tokens together.
        attention_weight: the deviation is multiplied by ``a ** attention_weight``,
            ``a`` the attention the token receives at the filtering layer from
            the uncached tokens' queries (the question), so deviations that the
            question would read count more. 0 ranks by deviation alone.
        attention_per_head: weight each K/V head's deviation by the attention
            that head's query heads give the token, then sum over heads
            (instead of total deviation x total attention).
        attention_queries: the attention weight counts the queries of the
            prompt's last ``attention_queries`` tokens only (0: every uncached token).
        drift: share of each passage's drift applied to its tokens that are not
            recomputed (``kvstore.blend.drift``): at every layer past
            ``check_layer``, the median over the passage's recomputed tokens of
            their fresh minus reused keys (position-free), times ``drift``, is
            added to the passage's other keys. 0 turns it off.
        drift_values: correct the values by their drift too (keys only by default).
        score_layers: the ranking at ``check_layer`` sums the (attention-weighted,
            mean-normalised) deviations of this many layers ending there: the
            full layers before it are computed for every token anyway, so a
            token's score is measured at several depths at no extra compute.
    """

    ratio: float = 0.15
    check_layer: int = 2
    gradual: tuple[float, ...] = (0.5, 0.3)
    min_passage_tokens: int = 16
    deviation: str = "kv"
    sink_tokens: int = 0
    per_passage: bool = False
    attention_weight: float = 0.5
    score_layers: int = 1
    attention_queries: int = 0
    influence: float = 0.0
    attention_per_head: bool = False
    drift: float = 0.5
    drift_values: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, (int, float)) or not 0.0 <= float(self.ratio) <= 1.0:
            raise InvalidInput(f"ratio must be in [0, 1], got {self.ratio!r}")
        if not isinstance(self.check_layer, int) or self.check_layer < 1:
            raise InvalidInput(f"check_layer must be an integer >= 1, got {self.check_layer!r}")
        steps = tuple(float(g) for g in self.gradual)
        if any(not 0.0 <= s <= 1.0 for s in steps):
            raise InvalidInput(f"gradual ratios must be in [0, 1], got {self.gradual!r}")
        if any(a < b for a, b in pairwise(steps)):
            raise InvalidInput(f"the gradual schedule {steps} must not increase")
        if self.deviation not in DEVIATIONS:
            raise InvalidInput(f"deviation must be one of {DEVIATIONS}, got {self.deviation!r}")
        f = self.influence
        if not isinstance(f, (int, float)) or not 0.0 <= float(f) <= 1.0:
            raise InvalidInput(f"influence must be in [0, 1], got {f!r}")
        d = self.drift
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not 0.0 <= float(d) <= 1.0:
            raise InvalidInput(f"drift must be in [0, 1], got {d!r}")
        if not isinstance(self.drift_values, bool):
            raise InvalidInput(f"drift_values must be a bool, got {self.drift_values!r}")
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise InvalidInput(f"sink_tokens must be an integer >= 0, got {self.sink_tokens!r}")
        w = self.attention_weight
        if not isinstance(w, (int, float)) or not 0.0 <= float(w) < float("inf"):
            raise InvalidInput(f"attention_weight must be a finite number >= 0, got {w!r}")
        if not isinstance(self.score_layers, int) or not 1 <= self.score_layers <= self.check_layer:
            # layer 0 sees embeddings alone: its fresh K/V equal the reused ones, nothing to rank by
            raise InvalidInput(f"score_layers must be an integer in [1, check_layer], got {self.score_layers!r}")
        if not isinstance(self.attention_per_head, bool):
            raise InvalidInput(f"attention_per_head must be a bool, got {self.attention_per_head!r}")
        if not isinstance(self.attention_queries, int) or self.attention_queries < 0:
            raise InvalidInput(f"attention_queries must be an integer >= 0, got {self.attention_queries!r}")
        if self.min_passage_tokens < 1:
            raise InvalidInput(f"min_passage_tokens must be >= 1, got {self.min_passage_tokens}")

    @property
    def schedule(self) -> tuple[float, ...]:
        """The ratio kept at ``check_layer``, ``check_layer+1``, ...; the last is ``ratio`` (gradual steps below it are raised to it)."""
        r = float(self.ratio)
        return (*(max(float(g), r) for g in self.gradual), r)

    @property
    def full_reuse(self) -> bool:
        return float(self.ratio) == 0.0

    def check_layers(self, num_layers: int) -> tuple[int, ...]:
        """The layers where tokens are filtered, checked against the model's depth.

        Raises:
            InvalidInput: the schedule runs past the model's last layer.
        """
        last = self.check_layer + len(self.schedule) - 1
        if last >= num_layers:
            raise InvalidInput(f"filtering reaches layer {last}, the model has {num_layers} layers")
        return tuple(range(self.check_layer, last + 1))
