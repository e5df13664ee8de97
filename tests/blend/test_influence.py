"""The influence ranking equals swapping each token's stale K/V back in, one at a time, and re-running attention."""

from __future__ import annotations

import math

import torch

from kvstore.blend.influence import attention_influence


def _brute(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ok: torch.Tensor, ov: torch.Tensor,
           sel: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    heads, kv_heads, d = q.shape[1], k.shape[1], q.shape[-1]
    g = heads // kv_heads
    rows = torch.nonzero(queries[sel]).reshape(-1)
    mask = sel[None, :] > sel[rows][:, None]

    def out(kk: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
        kk, vv = kk[0].repeat_interleave(g, 0), vv[0].repeat_interleave(g, 0)
        s = (q[0][:, rows] @ kk.transpose(1, 2)) / math.sqrt(d)
        return s.masked_fill(mask, float("-inf")).softmax(-1) @ vv  # [heads, m, d]

    base = out(k, v)
    score = torch.zeros(sel.numel(), dtype=torch.float64)
    for j in range(sel.numel()):
        kk, vv = k.clone(), v.clone()
        kk[:, :, j], vv[:, :, j] = ok[:, :, j], ov[:, :, j]
        score[j] = (out(kk, vv) - base).norm(dim=-1).sum()
    return score


def test_influence_equals_one_token_swaps() -> None:
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, n, d = 6, 2, 12, 8
    q = torch.randn(1, heads, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(1, kv_heads, n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(1, kv_heads, n, d, generator=gen, dtype=torch.float64)
    ok = k + 0.5 * torch.randn(k.shape, generator=gen, dtype=torch.float64)
    ov = v + 0.5 * torch.randn(v.shape, generator=gen, dtype=torch.float64)
    ok[:, :, 2] *= 6.0  # a stale sink-like key: its weight jumps far beyond first order
    sel = torch.tensor([0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 13, 14])
    queries = torch.zeros(15, dtype=torch.bool)
    queries[[0, 10, 13, 14]] = True  # position 0 sees only itself (a = 1)
    got = attention_influence(q, k, v, ok, ov, sel, queries)
    want = _brute(q, k, v, ok, ov, sel, queries)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)  # a = 1 (a row with one key) is clamped
    late_queries = queries.clone()
    late_queries[0] = False
    assert int(attention_influence(q, k, v, ok, ov, sel, late_queries).argmax()) == 2
    # tokens after every query are never read: no influence
    late = torch.zeros(15, dtype=torch.bool)
    late[[0, 5]] = True
    assert bool((attention_influence(q, k, v, ok, ov, sel, late)[5:] == 0).all())
