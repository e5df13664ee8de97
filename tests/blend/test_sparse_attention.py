"""The selected tokens' attention in runs (one plan, reused) equals one dense masked call (causal by position)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvstore.blend.llama import SparseAttention, sparse_attention
from kvstore.errors import InvalidInput, ShapeMismatch


@pytest.mark.parametrize(("n", "blocks"), [(1, 8), (5, 8), (37, 8), (37, 1), (200, 16)])
def test_runs_equal_one_masked_call(n: int, blocks: int) -> None:
    g = torch.Generator().manual_seed(n)
    total = 300
    q = torch.randn(1, 9, n, 64, generator=g)
    k, v = torch.randn(1, 3, total, 64, generator=g), torch.randn(1, 3, total, 64, generator=g)
    positions = torch.sort(torch.randperm(total, generator=g)[:n]).values
    mask = torch.arange(total)[None, :] <= positions[:, None]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], scale=0.125, enable_gqa=True)
    got = sparse_attention(q, k, v, positions, 0.125, blocks)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_one_plan_serves_every_layer_and_checks_its_input() -> None:
    g = torch.Generator().manual_seed(3)
    total, n = 120, 30
    positions = torch.sort(torch.randperm(total, generator=g)[:n]).values
    mask = torch.arange(total)[None, :] <= positions[:, None]
    plan = SparseAttention.plan(positions, groups=3, blocks=4)
    for _ in range(2):  # the same plan, other layers' tensors; query heads h read K/V head h // 3
        q = torch.randn(1, n, 6, 64, generator=g).transpose(1, 2)  # the projections' layout
        k, v = torch.randn(1, 2, total, 64, generator=g), torch.randn(1, 2, total, 64, generator=g)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], scale=0.125, enable_gqa=True)
        torch.testing.assert_close(plan(q, k, v, 0.125), want, atol=1e-5, rtol=1e-5)
    last = SparseAttention.plan(torch.tensor([total - 1]), groups=3)  # sees every key: no mask
    assert all(run.mask is None for run in last.runs)
    with pytest.raises(ShapeMismatch):
        plan(torch.randn(1, 6, n + 1, 64), k, v, 0.125)
    with pytest.raises(InvalidInput):
        SparseAttention.plan(torch.tensor([4, 2, 9]), groups=3)
    with pytest.raises(InvalidInput):
        SparseAttention.plan(torch.tensor([], dtype=torch.long), groups=3)
