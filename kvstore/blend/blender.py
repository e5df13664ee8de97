"""The blender: reused passage KV + selective recomputation -> one prompt's KV and next-token logits.

Per prompt (``Blender.blend``):

1. Assemble: lay the segments out in order; each passage's K is rotated from
   the positions it was computed at to its place in this prompt.
2. Layers before ``check_layer`` are computed for every token (full prefill).
3. At each filtering layer (``check_layer``, then one more per
   ``BlendConfig.gradual`` step), fresh K/V of the tokens still computed are
   compared with the reused K/V (``BlendConfig.deviation``), weighted by the
   attention each token gets from the uncached tokens' queries
   (``BlendConfig.attention_weight``), or by each token's effect on their
   attention output (``BlendConfig.influence``); the scores add up over the filtering
   layers, and the top share of the reused tokens the schedule names (last:
   ``ratio``), and every uncached token, go on. Fresh K/V of every token
   computed at a layer replace the reused K/V at their positions; past the
   check layer, each passage's keys not recomputed move by a share of the
   drift its recomputed keys show (``BlendConfig.drift``, ``kvstore.blend.drift``).
4. Later layers compute only the selected tokens: their queries attend to the
   whole assembled KV, each to positions <= its own. The last layer writes
   every selected token's K/V but runs attention and MLP for the prompt's
   last token only (nothing reads the other hidden states after it).

Always recomputed: every uncached token and the prompt's last token (its
logits start the answer). The attention sink: a prompt whose first segment is
a passage reuses it at its first position (computed there, exact); otherwise
the uncached prefix (e.g. the chat template's opening) is computed and is the
sink. Each passage's own first token was a sink in its standalone computation;
its deviation is large, so a non-zero ratio normally picks it first (``sink_tokens`` forces it).

``ratio == 0`` is full reuse: no layer is computed in full, the uncached
tokens are computed against the reused KV at every layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvstore.blend.config import BlendConfig
from kvstore.blend.drift import DriftPlan
from kvstore.blend.influence import attention_influence
from kvstore.blend.llama import LayerQKV, LlamaStack, SparseAttention
from kvstore.blend.rope import RopeSpec, rope_from_model, shift_angles, shift_keys_into
from kvstore.blend.segments import Assembled, PassageKV, Segment
from kvstore.blend.select import head_deviation, keep_count, kv_deviation, select_per_group, select_tokens
from kvstore.errors import InvalidInput, ShapeMismatch
from kvstore.spec import KVSpec

if TYPE_CHECKING:
    from transformers import DynamicCache, PretrainedConfig, PreTrainedModel


@dataclass(frozen=True, slots=True, eq=False)
class BlendResult:
    """One blended prompt.

    Attributes:
        ids: the prompt's token ids ``[T]``.
        logits: next-token logits after the last prompt token ``[vocab]``.
        keys, values: the prompt's KV per layer, ``[layers, kv_heads, T, head_dim]`` float32 (views of
            token-major storage, not contiguous).
        reused: bool ``[T]``, positions whose KV came from a passage.
        recomputed: positions computed through the last layer (ascending).
    """

    ids: torch.Tensor
    logits: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    reused: torch.Tensor
    recomputed: torch.Tensor

    @property
    def recomputed_reused_fraction(self) -> float:
        """Fraction of the reused tokens recomputed through the last layer."""
        n = int(self.reused.sum())
        return float(self.reused[self.recomputed].sum()) / n if n else 0.0

    def cache(self, config: PretrainedConfig | None = None) -> DynamicCache:
        """A transformers ``DynamicCache`` holding the prompt's KV (decode or teacher-force from it)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=config)
        for i in range(self.keys.shape[0]):
            cache.update(self.keys[i : i + 1], self.values[i : i + 1], i)
        return cache


class Blender:
    """Blends reused passage KV into prompts for one Llama-architecture model.

    Invariant: the model is only read (eval mode, no gradients); every
    passage's KV geometry matches the model's, checked before any compute.
    """

    def __init__(self, model: PreTrainedModel, config: BlendConfig | None = None, spec: KVSpec | None = None) -> None:
        """Raises InvalidInput (unsupported model), RopeScalingUnsupported, or ShapeMismatch (``spec`` names another geometry)."""
        config = config or BlendConfig()
        self.model = model
        self.config = config
        self.stack = LlamaStack(model)
        self.rope: RopeSpec = rope_from_model(model)
        config.check_layers(self.stack.num_layers)
        if spec is not None:
            check_spec(spec, self.stack)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)

    def assemble(self, segments: Sequence[Segment]) -> Assembled:
        """Lay the segments out, passages' keys re-rotated to their new positions.

        Raises:
            InvalidInput: no tokens, a passage shorter than ``min_passage_tokens``, or a prompt
                longer than the model's positions.
            ShapeMismatch: a passage's KV geometry is not the model's.
        """
        parts: list[torch.Tensor] = []
        passages: list[tuple[int, PassageKV]] = []
        offset = 0
        for seg in segments:
            if isinstance(seg, PassageKV):
                self._check_passage(seg)
                passages.append((offset, seg))
                parts.append(torch.tensor(seg.tokens, dtype=torch.long))
                offset += len(seg)
            else:
                ids = torch.as_tensor(list(seg), dtype=torch.long).reshape(-1)
                parts.append(ids)
                offset += int(ids.numel())
        if offset == 0:
            raise InvalidInput("a blended prompt needs at least one token")
        if self.max_positions and offset > self.max_positions:
            raise InvalidInput(f"prompt of {offset} tokens exceeds the model's {self.max_positions} positions")
        s = self.stack
        # token-major storage (the passages' own layout: each passage is one slab per layer, no transposition);
        # every position is written once: reused ones from their passage, uncached ones with zeros
        keys = torch.empty(s.num_layers, offset, s.num_kv_heads, s.head_dim)
        values = torch.empty_like(keys)
        reused = torch.zeros(offset, dtype=torch.bool)
        passage_of = torch.full((offset,), -1, dtype=torch.long)
        covered = 0
        for n, (start, p) in enumerate(passages):
            end = start + len(p)
            keys[:, covered:start] = 0.0
            values[:, covered:start] = 0.0
            shift_keys_into(keys[:, start:end], p.kv[:, 0], start - p.start_position, self.rope)
            values[:, start:end] = p.kv[:, 1]
            reused[start:end] = True
            passage_of[start:end] = n
            covered = end
        keys[:, covered:] = 0.0
        values[:, covered:] = 0.0
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)
        return Assembled(torch.cat(parts), reused, keys, values, tuple(o for o, _ in passages), passage_of)

    def blend(self, segments: Sequence[Segment]) -> BlendResult:
        """Blend one prompt; see the module docstring. Raises what :meth:`assemble` raises."""
        with torch.inference_mode():
            return self._run(self.assemble(segments))

    def _run(self, a: Assembled) -> BlendResult:
        s, cfg = self.stack, self.config
        total = a.num_tokens
        forced = ~a.reused
        forced[-1] = True
        n_reused = int(a.reused.sum())
        full_reuse = cfg.full_reuse
        candidates = a.reused.clone()
        sinks = 0
        if cfg.sink_tokens and not full_reuse:
            for start in a.passage_offsets:
                sinks += int(candidates[start : start + cfg.sink_tokens].sum())
                forced[start : start + cfg.sink_tokens] = True
                candidates[start : start + cfg.sink_tokens] = False
        sizes = torch.bincount(a.passage_of[a.reused], minlength=len(a.passage_offsets))
        filters = {} if full_reuse else dict(zip(cfg.check_layers(s.num_layers), cfg.schedule))
        scored = set() if full_reuse else set(range(max(cfg.check_layer - cfg.score_layers + 1, 0), cfg.check_layer))
        score = torch.zeros(total)
        sel = torch.nonzero(forced).reshape(-1) if full_reuse else torch.arange(total)
        in_order = sel.numel() == total
        h = s.embed(a.ids[sel])
        rotary = s.rotary(sel)
        plan: SparseAttention | None = None
        recomputed = sel
        last = s.num_layers - 1
        drift: DriftPlan | None = None
        angles = shift_angles(self.rope, torch.arange(total)) if cfg.drift and not full_reuse else None
        for i in range(s.num_layers):
            p = s.qkv(i, h, rotary)
            keys, values = a.keys[i : i + 1], a.values[i : i + 1]
            q = p.q
            local = None
            old = None
            if angles is not None and i > cfg.check_layer:
                if drift is None:
                    drift = DriftPlan.build(sel, a.reused, a.passage_of, *angles, self.rope)
                old = drift.old(keys, values)
            if i in filters or i in scored:
                score[sel] += self._score(p, keys[:, :, sel], values[:, :, sel], sel, forced, candidates)
            if i in filters:
                # sink tokens are recomputed reused tokens too: they come out of the ratio's budget
                keep = max(keep_count(filters[i], n_reused) - sinks, 0)
                if cfg.per_passage:
                    local = select_per_group(score[sel], candidates[sel], forced[sel], a.passage_of[sel], sizes,
                                             filters[i])
                else:
                    local = select_tokens(score[sel], candidates[sel], forced[sel], keep)
            keys[:, :, sel] = p.k
            values[:, :, sel] = p.v
            if drift is not None and old is not None:
                drift.apply(keys, values, p.k, p.v, *old, cfg.drift, cfg.drift_values)
            if local is not None and local.numel() != sel.numel():
                sel, h, q, in_order, plan, drift = sel[local], h[:, local], q[:, :, local], False, None, None
                if i < last:
                    rotary = s.rotary(sel)
            recomputed = sel
            if i == last and sel.numel() > 1:
                # after the last layer only the prompt's last hidden state is read (its logits); every
                # computed token's K/V of this layer is written above
                h, q, in_order, plan = h[:, -1:], q[:, :, -1:], False, s.attention_plan(sel[-1:])
            if not in_order and plan is None:
                plan = s.attention_plan(sel)
            h = s.finish(i, h, q, keys, values, None if in_order else plan)
        logits = s.logits(h[:, -1:])[-1]
        return BlendResult(a.ids, logits, a.keys, a.values, a.reused, recomputed)

    def _score(self, p: LayerQKV, old_k: torch.Tensor, old_v: torch.Tensor, sel: torch.Tensor,
               forced: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """One layer's ranking score of the computed tokens ``sel``: deviation x attention^w and/or influence, each mean 1 over candidates."""
        cfg = self.config
        queries = forced
        if cfg.attention_queries:
            queries = torch.zeros_like(forced)
            queries[-cfg.attention_queries :] = True
        dev = torch.zeros(sel.numel())
        cand = candidates[sel]
        if cfg.influence < 1.0:
            dev += (1.0 - cfg.influence) * _unit_mean(self._deviation(p, old_k, old_v, sel, queries), cand)
        if cfg.influence > 0.0:
            dev += cfg.influence * _unit_mean(attention_influence(p.q, p.k, p.v, old_k, old_v, sel, queries), cand)
        return dev

    def _deviation(self, p: LayerQKV, old_k: torch.Tensor, old_v: torch.Tensor, sel: torch.Tensor,
                   queries: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.attention_per_head and cfg.attention_weight:
            per_head = head_deviation(p.k, p.v, old_k, old_v, cfg.deviation)  # [kv_heads, n]
            mass = attention_mass(p.q, p.k, sel, queries, per_kv_head=True)
            return (per_head * mass.pow(cfg.attention_weight)).sum(0)
        dev = kv_deviation(p.k, p.v, old_k, old_v, cfg.deviation)
        if cfg.attention_weight:
            dev = dev * attention_mass(p.q, p.k, sel, queries).pow(cfg.attention_weight)
        return dev

    def _check_passage(self, p: PassageKV) -> None:
        s = self.stack
        want = (s.num_layers, 2, len(p), s.num_kv_heads, s.head_dim)
        if tuple(p.kv.shape) != want:
            raise ShapeMismatch(f"passage KV has shape {tuple(p.kv.shape)}, this model needs {want}")
        if len(p) < self.config.min_passage_tokens:
            raise InvalidInput(
                f"passage of {len(p)} tokens is shorter than min_passage_tokens={self.config.min_passage_tokens}; "
                "pass it as uncached tokens"
            )
        if not p.kv.is_floating_point():
            raise InvalidInput(f"passage KV must be floating point, got {p.kv.dtype}")


def _unit_mean(score: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``score`` scaled to mean 1 over the candidates (unchanged where there are none)."""
    if not candidates.any():
        return score
    return score / score[candidates].mean().clamp_min(torch.finfo(torch.float32).tiny)


def attention_mass(
    q: torch.Tensor, k: torch.Tensor, sel: torch.Tensor, forced: torch.Tensor, per_kv_head: bool = False
) -> torch.Tensor:
    """Attention each computed token receives from the queries of the ``forced`` positions (summed over heads), ``[n]``
    (``[kv_heads, n]`` with ``per_kv_head``: summed over each K/V head's query heads).

    ``q`` ``[1, heads, n, d]``, ``k`` ``[1, kv_heads, n, d]`` at positions ``sel``; causal by position.
    """
    rows = torch.nonzero(forced[sel]).reshape(-1)
    qf = q[0][:, rows]  # [heads, m, d]
    kf = k[0].repeat_interleave(qf.shape[0] // k.shape[1], dim=0)  # [heads, n, d]
    scores = qf @ kf.transpose(1, 2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(sel[None, None, :] > sel[rows][None, :, None], float("-inf"))
    weights = scores.softmax(-1)  # [heads, m, n]
    if per_kv_head:
        return weights.sum(dim=1).reshape(k.shape[1], -1, weights.shape[-1]).sum(1)
    return weights.sum(dim=(0, 1))


def check_spec(spec: KVSpec, stack: LlamaStack) -> None:
    """Raise ShapeMismatch unless ``spec`` describes this model's KV geometry (separate K/V layout)."""
    got = (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.layout)
    want = (stack.num_layers, stack.num_kv_heads, stack.head_dim, "kv_separate")
    if got != want:
        raise ShapeMismatch(f"KV spec (layers, kv_heads, head_dim, layout) = {got}, the model has {want}")
