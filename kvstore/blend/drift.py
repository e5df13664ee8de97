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
class DriftPlan:
    """Drift correction for one set of computed tokens, built once and applied at every layer computing that set.

    The *rows* are the recomputed reused tokens the estimates rest on (each
    passage's opening left out, passages with too few left out), in prompt
    order, so each corrected passage's rows are one slice ``spans[g]``:
    ``local`` indexes them among the computed tokens, ``positions`` are their
    prompt positions, ``back_cos``/``back_sin`` turn their key drifts to
    position 0. ``targets`` are the corrected passages' positions not
    computed, ``target_group`` the index of each one's passage in ``spans``,
    ``to_cos``/``to_sin`` turn a position-free drift to each target's position
    (angles ``[n, rotary_dim/2]``).
    """

    local: torch.Tensor
    positions: torch.Tensor
    spans: tuple[tuple[int, int], ...]
    back_cos: torch.Tensor
    back_sin: torch.Tensor
    targets: torch.Tensor
    target_group: torch.Tensor
    to_cos: torch.Tensor
    to_sin: torch.Tensor
    rope: RopeSpec

    @classmethod
    def build(cls, sel: torch.Tensor, reused: torch.Tensor, passage_of: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, rope: RopeSpec) -> DriftPlan:
        """Plan for computed positions ``sel`` (ascending) of a prompt.

        Args:
            reused: bool ``[T]``, positions holding passage KV.
            passage_of: int ``[T]``, each position's passage (-1: uncached); a passage's positions are contiguous.
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
        stale = reused & ~computed
        opening = torch.ones(total, dtype=torch.bool, device=reused.device)
        opening[1:] = passage_of[1:] != passage_of[:-1]
        usable = computed & reused & ~opening
        keep_rows = torch.zeros(total, dtype=torch.bool, device=reused.device)
        keep_targets = torch.zeros_like(keep_rows)
        counts: list[int] = []
        for n in torch.unique(passage_of[stale]).tolist():
            member = passage_of == n
            rows = usable & member
            count = int(rows.sum())
            if count < MIN_TOKENS:
                continue
            keep_rows |= rows
            keep_targets |= stale & member
            counts.append(count)
        positions = torch.nonzero(keep_rows).reshape(-1)
        local = torch.searchsorted(sel, positions)
        bounds = [0, *torch.tensor(counts, dtype=torch.long).cumsum(0).tolist()]
        targets = torch.nonzero(keep_targets).reshape(-1)
        groups = passage_of[positions[torch.tensor(bounds[:-1], dtype=torch.long)]] if counts else passage_of[:0]
        target_group = torch.searchsorted(groups, passage_of[targets])
        return cls(local, positions, tuple(zip(bounds[:-1], bounds[1:])), cos[positions], -sin[positions], targets,
                   target_group, cos[targets], sin[targets], rope)

    def old(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The reused K/V of the plan's rows (copies: read them before the fresh ones are written); None if the plan
        corrects nothing."""
        if not self.spans:
            return None
        return keys[:, :, self.positions], values[:, :, self.positions]

    def apply(self, keys: torch.Tensor, values: torch.Tensor, fresh_k: torch.Tensor, fresh_v: torch.Tensor,
              old_k: torch.Tensor, old_v: torch.Tensor, share: float, correct_values: bool) -> None:
        """Add ``share`` x each passage's drift to its tokens not recomputed, in ``keys``/``values`` (one layer,
        ``[1, kv_heads, T, head_dim]``). ``fresh_k``/``fresh_v`` are the layer's K/V of every computed token
        (``[1, kv_heads, len(sel), head_dim]``), ``old_k``/``old_v`` what :meth:`old` returned."""
        if not self.spans:
            return
        free = rotate_pairs(fresh_k[:, :, self.local] - old_k, self.back_cos, self.back_sin, self.rope)
        drift = _medians(free, self.spans).index_select(2, self.target_group)
        keys.index_add_(2, self.targets, rotate_pairs(drift, self.to_cos, self.to_sin, self.rope), alpha=share)
        if correct_values:
            dv = _medians(fresh_v[:, :, self.local] - old_v, self.spans).index_select(2, self.target_group)
            values.index_add_(2, self.targets, dv, alpha=share)


def _medians(x: torch.Tensor, spans: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Per-span medians over dim 2 of ``x`` ``[1, heads, n, d]``: ``[1, heads, len(spans), d]``."""
    return torch.cat([x[:, :, lo:hi].median(dim=2, keepdim=True).values for lo, hi in spans], dim=2)
