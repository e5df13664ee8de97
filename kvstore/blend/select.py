"""Ranking reused tokens by KV deviation and choosing which to recompute.

A reused token's deviation at a layer is the squared distance between its
reused K/V and the K/V computed afresh in the new context, summed over kv
heads and head dimensions of both K and V. The tokens whose KV deviates most
are the ones whose cross-passage attention the reuse missed; recomputing
them repairs most of the damage (CacheBlend, EuroSys'25).
"""

from __future__ import annotations

import torch

from kvstore.errors import InvalidInput


def kv_deviation(
    fresh_k: torch.Tensor, fresh_v: torch.Tensor, old_k: torch.Tensor, old_v: torch.Tensor
) -> torch.Tensor:
    """Per-token ``sum((K - K')^2) + sum((V - V')^2)`` over heads and dims; inputs ``[1, kv_heads, n, d]``.

    Returns:
        float32 ``[n]``.
    """
    if fresh_k.shape != old_k.shape or fresh_v.shape != old_v.shape:
        raise InvalidInput(f"deviation of shapes {tuple(fresh_k.shape)} vs {tuple(old_k.shape)}")
    dk = (fresh_k.float() - old_k.float()).square().sum(dim=(0, 1, 3))
    dv = (fresh_v.float() - old_v.float()).square().sum(dim=(0, 1, 3))
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
