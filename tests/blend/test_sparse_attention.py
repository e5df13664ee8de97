"""The selected tokens' attention in runs equals one dense masked call (causal by position)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvstore.blend.llama import sparse_attention


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
