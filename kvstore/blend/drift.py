"""Drift correction: the reused K/V a blend does not recompute, moved by what the recomputed ones show.

After the filtering layers a blend computes a share of each passage's tokens
afresh; the others keep the K/V the passage had on its own. The recomputed
tokens' fresh minus reused K/V (their *drift*) is largely shared by the whole
passage: what the standalone computation missed (the text before the
passage) moves its tokens alike. So at every layer past the check layer,
each passage token that is not recomputed there gets its passage's drift,
estimated per K/V head and dimension as the median over the passage's
recomputed tokens (robust to the few with huge deviations), times ``share``
(< 1: the recomputed tokens were chosen as the most deviating, so their
drift overstates the rest's). The passage's opening token is left out of
the estimate: it was an attention sink on its own, and its drift is of
another kind.

Keys are compared position-free: each recomputed key's drift is turned back
by its position's RoPE angles before the median, and the median is turned to
each corrected token's position (RoPE is a rotation per position, and a
key's drift rotates with it). Values carry no position.

A passage with fewer than ``MIN_TOKENS`` recomputed tokens at a layer is
left as it is there (too few to estimate from). Only keys are corrected by
default: correcting the values as well measured no better (see docs/blend.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.blend.rope import RopeSpec, rotate_pairs
from kvstore.errors import InvalidInput

MIN_TOKENS = 16
"""Fewest recomputed tokens (its opening not counted) a passage needs for its drift to be estimated: a median
over fewer is noisy, and on passages of ~100 tokens at r = 0.15 it was measured to do more harm than good."""


@dataclass(frozen=True, slots=True, eq=False)
class DriftGroup:
    """One passage: ``rows`` index the plan's recomputed reused tokens that belong to it, ``targets`` are its
    prompt positions not recomputed; ``back_*`` turn the rows' key drifts to position 0, ``to_*`` turn a
    position-free drift to each target's position (``[n, rotary_dim/2]`` each)."""

    rows: torch.Tensor
    targets: torch.Tensor
    back_cos: torch.Tensor
    back_sin: torch.Tensor
    to_cos: torch.Tensor
    to_sin: torch.Tensor


@dataclass(frozen=True, slots=True, eq=False)
class DriftPlan:
    """Drift correction for one set of computed tokens, built once and applied at every layer computing that set.

    ``local`` indexes the computed tokens (``sel``) that are reused ones,
    ``positions`` their prompt positions.
    """

    local: torch.Tensor
    positions: torch.Tensor
    groups: tuple[DriftGroup, ...]
    rope: RopeSpec

    @classmethod
    def build(cls, sel: torch.Tensor, reused: torch.Tensor, passage_of: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, rope: RopeSpec) -> DriftPlan:
        """Plan for computed positions ``sel`` (ascending) of a prompt.

        Args:
            reused: bool ``[T]``, positions holding passage KV.
            passage_of: int ``[T]``, each position's passage (-1: uncached).
            cos, sin: RoPE angles of every prompt position ``0 .. T-1``, ``[T, rotary_dim/2]``
                (:func:`kvstore.blend.rope.shift_angles` of ``arange(T)``).

        Raises:
            InvalidInput: the tensors do not describe one prompt.
        """
        total = int(reused.numel())
        if passage_of.numel() != total or cos.shape[0] != total or sin.shape != cos.shape:
            raise InvalidInput(f"drift plan needs one entry per position: reused {total}, passage_of "
                               f"{passage_of.numel()}, angles {tuple(cos.shape)} / {tuple(sin.shape)}")
        computed = torch.zeros(total, dtype=torch.bool, device=reused.device)
        computed[sel] = True
        local = torch.nonzero(reused[sel]).reshape(-1)
        positions = sel[local]
        owner = passage_of[positions]
        stale = reused & ~computed
        groups = []
        for n in torch.unique(passage_of[stale]).tolist():
            opening = int(torch.nonzero(passage_of == n)[0])
            rows = torch.nonzero((owner == n) & (positions > opening)).reshape(-1)
            if rows.numel() < MIN_TOKENS:
                continue
            targets = torch.nonzero(stale & (passage_of == n)).reshape(-1)
            at = positions[rows]
            groups.append(DriftGroup(rows, targets, cos[at], -sin[at], cos[targets], sin[targets]))
        return cls(local, positions, tuple(groups), rope)

    def old(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reused K/V of the plan's recomputed reused tokens (copies; read them before the fresh ones are written)."""
        return keys[:, :, self.positions], values[:, :, self.positions]

    def apply(self, keys: torch.Tensor, values: torch.Tensor, fresh_k: torch.Tensor, fresh_v: torch.Tensor,
              old_k: torch.Tensor, old_v: torch.Tensor, share: float, correct_values: bool) -> None:
        """Add ``share`` x each passage's drift to its tokens not recomputed, in ``keys``/``values`` (one layer,
        ``[1, kv_heads, T, head_dim]``). ``fresh_k``/``fresh_v`` are the layer's K/V of every computed token
        (``[1, kv_heads, len(sel), head_dim]``), ``old_k``/``old_v`` what :meth:`old` returned."""
        if not self.groups:
            return
        dk = fresh_k[:, :, self.local] - old_k
        dv = fresh_v[:, :, self.local] - old_v if correct_values else None
        for g in self.groups:
            free = rotate_pairs(dk[:, :, g.rows], g.back_cos, g.back_sin, self.rope)
            drift = free.median(dim=2, keepdim=True).values.expand(-1, -1, g.targets.numel(), -1)
            keys[:, :, g.targets] += share * rotate_pairs(drift, g.to_cos, g.to_sin, self.rope)
            if dv is not None:
                values[:, :, g.targets] += share * dv[:, :, g.rows].median(dim=2, keepdim=True).values
