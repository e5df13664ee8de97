"""How much a reused token's stale K/V moves the question's attention output (``deviation="influence"``).

For a query ``i`` (an uncached token) and a key ``j`` (a computed token) of one
head, with fresh ``k_j``/``v_j``, reused (stale) ``k'_j``/``v'_j`` and the
fresh attention ``a = softmax(q_i . k / sqrt(d))_j``: putting the stale K/V of
``j`` alone back into the row moves the weight of ``j`` to
``a' = sigmoid(logit(a) + q_i . (k'_j - k_j) / sqrt(d))`` and the output by

    dO_ij = a' (v'_j - u) - a (v_j - u),   u = (o_i - a v_j) / (1 - a)

(``u``: the row's output over the other keys), exactly, for one token swapped
at a time. A token's influence is ``sum over heads and queries of |dO_ij|``:
K deviations in directions the question's queries do not read, and V
deviations of tokens the question does not attend to, count for nothing;
a stale attention sink (large ``q . k'``) counts as much as the weight it
would pull.
"""

from __future__ import annotations

import math

import torch


def attention_influence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, old_k: torch.Tensor, old_v: torch.Tensor,
    sel: torch.Tensor, queries: torch.Tensor,
) -> torch.Tensor:
    """Influence ``[n]`` of each computed token's stale K/V on the ``queries`` rows' attention outputs.

    Args:
        q: fresh queries ``[1, heads, n, d]`` of the computed tokens (positions ``sel``).
        k, v: their fresh keys/values ``[1, kv_heads, n, d]``.
        old_k, old_v: the reused keys/values at the same positions.
        sel: ``[n]`` prompt positions of the computed tokens (ascending); attention is causal by position.
        queries: bool ``[T]`` over the prompt: the query positions that count (those in ``sel``).
    """
    rows = torch.nonzero(queries[sel]).reshape(-1)
    heads, kv_heads, d = q.shape[1], k.shape[1], q.shape[-1]
    g = heads // kv_heads
    scale = 1.0 / math.sqrt(d)
    qr = q[0][:, rows]  # [heads, m, d]
    fk, fv = k[0].repeat_interleave(g, 0), v[0].repeat_interleave(g, 0)  # [heads, n, d]
    ok, ov = old_k[0].to(q.dtype).repeat_interleave(g, 0), old_v[0].to(q.dtype).repeat_interleave(g, 0)
    hidden = sel[None, None, :] > sel[rows][None, :, None]
    s = (qr @ fk.transpose(1, 2)) * scale
    s = s.masked_fill(hidden, float("-inf"))
    log_a = s - torch.logsumexp(s, -1, keepdim=True)
    a = log_a.exp()
    shift = ((qr @ ok.transpose(1, 2)) * scale - s).masked_fill(hidden, 0.0)
    a2 = torch.sigmoid(log_a - torch.log1p(-a.clamp_max(1 - 1e-6)) + shift)
    o = a @ fv  # [heads, m, d]
    ov_dot = o @ ov.transpose(1, 2)  # o . v'
    o_dot = o @ fv.transpose(1, 2)  # o . v
    vv = fv.square().sum(-1)[:, None, :]  # |v|^2, [heads, 1, n]
    vv2 = ov.square().sum(-1)[:, None, :]  # |v'|^2
    v_v2 = (fv * ov).sum(-1)[:, None, :]  # v . v'
    oo = o.square().sum(-1, keepdim=True)  # |o|^2, [heads, m, 1]
    rest = (1 - a).clamp_min(1e-6)
    uu = (oo - 2 * a * o_dot + a * a * vv) / rest.square()  # |u|^2
    u_v = (o_dot - a * vv) / rest
    u_v2 = (ov_dot - a * v_v2) / rest
    c = a2 - a
    # |a' v' - a v - (a' - a) u|^2
    norm2 = (a2 * a2 * vv2 + a * a * vv + c * c * uu - 2 * a * a2 * v_v2 - 2 * a2 * c * u_v2 + 2 * a * c * u_v)
    return norm2.clamp_min(0.0).sqrt().sum(dim=(0, 1))
