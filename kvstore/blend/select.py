"""Ranking reused tokens by KV deviation and choosing which to recompute.

A reused token's deviation at a layer measures how far its reused K/V lie
from the K/V computed afresh in the new context. The tokens whose KV deviates
most are the ones whose cross-passage attention the reuse missed;
recomputing them repairs most of the damage (CacheBlend, EuroSys'25).

Measures (``BlendConfig.deviation``):

- ``"kv"``: ``sum((K - K')^2) + sum((V - V')^2)`` over kv heads and dims.
- ``"k"`` / ``"v"``: the K or the V term alone.
- ``"kv_head_norm"``: each kv head's K and V squared distances divided by
  their mean over the tokens being ranked, then summed, so no single head or
  the K/V scale difference dominates the ranking.
"""

from __future__ import annotations

from typing import Literal

import torch

from kvstore.errors import InvalidInput

Deviation = Literal["kv", "k", "v", "kv_head_norm"]
DEVIATIONS: tuple[str, ...] = ("kv", "k", "v", "kv_head_norm")


def _squared_deviations(
    fresh_k: torch.Tensor, fresh_v: torch.Tensor, old_k: torch.Tensor, old_v: torch.Tensor, measure: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared K and V deviations per (kv head, token): float32 ``[kv_heads, n]`` each.

    Raises:
        InvalidInput: shapes differ, or an unknown measure.
    """
    if fresh_k.shape != old_k.shape or fresh_v.shape != old_v.shape:
        raise InvalidInput(f"deviation of shapes {tuple(fresh_k.shape)} vs {tuple(old_k.shape)}")
    if measure not in DEVIATIONS:
        raise InvalidInput(f"deviation measure must be one of {DEVIATIONS}, got {measure!r}")
    dk = (fresh_k.float() - old_k.float()).square().sum(dim=(0, 3))
    dv = (fresh_v.float() - old_v.float()).square().sum(dim=(0, 3))
    return dk, dv


def kv_deviation(
    fresh_k: torch.Tensor, fresh_v: torch.Tensor, old_k: torch.Tensor, old_v: torch.Tensor, measure: str = "kv"
) -> torch.Tensor:
    """Per-token deviation of fresh vs reused K/V (inputs ``[1, kv_heads, n, d]``) by ``measure`` (see module doc).

    Returns:
        float32 ``[n]``.

    Raises:
        InvalidInput: shapes differ, or an unknown measure.
    """
    dk, dv = _squared_deviations(fresh_k, fresh_v, old_k, old_v, measure)
    if measure == "k":
        return dk.sum(0)
    if measure == "v":
        return dv.sum(0)
    if measure == "kv_head_norm":
        eps = torch.finfo(torch.float32).tiny
        return (dk / dk.mean(1, keepdim=True).clamp_min(eps) + dv / dv.mean(1, keepdim=True).clamp_min(eps)).sum(0)
    return dk.sum(0) + dv.sum(0)


def head_deviation(
    fresh_k: torch.Tensor, fresh_v: torch.Tensor, old_k: torch.Tensor, old_v: torch.Tensor, measure: str = "kv"
) -> torch.Tensor:
    """Like :func:`kv_deviation`, per kv head: float32 ``[kv_heads, n]`` (``"kv_head_norm"`` normalises each head).

    Raises:
        InvalidInput: shapes differ, or an unknown measure.
    """
    dk, dv = _squared_deviations(fresh_k, fresh_v, old_k, old_v, measure)
    if measure == "k":
        return dk
    if measure == "v":
        return dv
    if measure == "kv_head_norm":
        eps = torch.finfo(torch.float32).tiny
        return dk / dk.mean(1, keepdim=True).clamp_min(eps) + dv / dv.mean(1, keepdim=True).clamp_min(eps)
    return dk + dv


def keep_count(ratio: float, reused_total: int) -> int:
    """How many reused tokens a ratio keeps: ``round(ratio * reused_total)``."""
    return min(reused_total, round(ratio * reused_total))


def select_tokens(deviation: torch.Tensor, candidates: torch.Tensor, forced: torch.Tensor, keep: int) -> torch.Tensor:
    """Local indices (ascending) of the tokens kept: every ``forced`` one plus the ``keep`` most deviating candidates.

    Args:
        deviation: ``[n]`` deviation of each computed token (ignored where not a candidate).
        candidates: bool ``[n]``: reused tokens that may be dropped.
        forced: bool ``[n]``: tokens always kept (uncached ones).
        keep: how many candidates to keep (clipped to how many there are).
    """
    n_cand = int(candidates.sum())
    keep = max(0, min(keep, n_cand))
    chosen = forced.clone()
    if keep:
        score = torch.where(candidates, deviation.float(), torch.full_like(deviation, -1.0, dtype=torch.float32))
        top = torch.topk(score, keep, sorted=False).indices
        chosen[top] = True
    return torch.nonzero(chosen, as_tuple=False).reshape(-1)


def select_per_group(
    deviation: torch.Tensor, candidates: torch.Tensor, forced: torch.Tensor, groups: torch.Tensor,
    sizes: torch.Tensor, ratio: float,
) -> torch.Tensor:
    """Like :func:`select_tokens`, but the top ``ratio`` of each group (passage) separately.

    Args:
        groups: int ``[n]``: the group of each computed token (-1: none).
        sizes: int ``[groups]``: each group's full size; a group keeps
            ``keep_count(ratio, size)`` of its candidates, so every passage
            keeps the same share however many of its tokens are still candidates.
    """
    chosen = forced.clone()
    for g in torch.unique(groups[candidates]).tolist():
        member = candidates & (groups == g)
        keep = keep_count(ratio, int(sizes[g]))
        local = select_tokens(deviation, member, torch.zeros_like(forced), keep)
        chosen[local] = True
    return torch.nonzero(chosen, as_tuple=False).reshape(-1)
