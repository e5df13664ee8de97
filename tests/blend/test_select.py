"""Deviation measures and token selection, on small exact tensors."""

from __future__ import annotations

import pytest
import torch

from kvstore.blend.blender import attention_mass
from kvstore.blend.config import BlendConfig
from kvstore.blend.select import DEVIATIONS, head_deviation, kv_deviation, select_per_group, select_tokens
from kvstore.errors import InvalidInput


def _kv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two kv heads, three tokens: token 0 moves K on head 0 (large scale), token 1 moves V, token 2 moves K on head 1."""
    old_k, old_v = torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)
    k, v = old_k.clone(), old_v.clone()
    k[0, 0, 0, 0] = 10.0  # squared distance 100, on the head whose K differs most overall
    v[0, 1, 1, 0] = 3.0  # 9
    k[0, 1, 2, 0] = 2.0  # 4, but the only K change on head 1
    return k, v, old_k, old_v


def test_measures() -> None:
    k, v, ok, ov = _kv()
    assert kv_deviation(k, v, ok, ov).tolist() == [100.0, 9.0, 4.0]
    assert kv_deviation(k, v, ok, ov, "k").tolist() == [100.0, 0.0, 4.0]
    assert kv_deviation(k, v, ok, ov, "v").tolist() == [0.0, 9.0, 0.0]
    # per-head normalisation: each head's only changed token scores the same (3 = n / 1 token)
    torch.testing.assert_close(kv_deviation(k, v, ok, ov, "kv_head_norm"), torch.tensor([3.0, 3.0, 3.0]))
    assert head_deviation(k, v, ok, ov).tolist() == [[100.0, 0.0, 0.0], [0.0, 9.0, 4.0]]
    for m in DEVIATIONS:  # the per-head figures sum to the token's
        torch.testing.assert_close(head_deviation(k, v, ok, ov, m).sum(0), kv_deviation(k, v, ok, ov, m))
    with pytest.raises(InvalidInput, match="deviation measure"):
        kv_deviation(k, v, ok, ov, "q")
    with pytest.raises(InvalidInput, match="deviation measure"):
        head_deviation(k, v, ok, ov, "q")
    with pytest.raises(InvalidInput):
        kv_deviation(k, v[:, :, :2], ok, ov)


def test_global_and_per_group_selection() -> None:
    dev = torch.tensor([9.0, 8.0, 7.0, 6.0, 1.0, 0.5, 0.4, 0.3, 0.0])
    cand = torch.tensor([True] * 8 + [False])
    forced = torch.tensor([False] * 8 + [True])
    assert select_tokens(dev, cand, forced, 2).tolist() == [0, 1, 8]
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, -1])
    sizes = torch.tensor([4, 4])
    # the top half of each passage, not the top four overall
    assert select_per_group(dev, cand, forced, groups, sizes, 0.5).tolist() == [0, 1, 4, 5, 8]


def test_attention_mass_from_uncached_queries() -> None:
    # two heads sharing one kv head; tokens 0-2 reused, token 3 the uncached query
    k = torch.zeros(1, 1, 4, 2)
    k[0, 0, 1] = torch.tensor([8.0, 0.0])  # the key the query matches
    q = torch.zeros(1, 2, 4, 2)
    q[0, :, 3] = torch.tensor([1.0, 0.0])
    sel = torch.arange(4)
    forced = torch.tensor([False, False, False, True])
    mass = attention_mass(q, k, sel, forced)
    assert mass.shape == (4,) and abs(float(mass.sum()) - 2.0) < 1e-5  # one query row per head
    assert int(mass.argmax()) == 1 and float(mass[1]) > 1.9
    per_head = attention_mass(q, k, sel, forced, per_kv_head=True)
    assert per_head.shape == (1, 4)
    torch.testing.assert_close(per_head[0], mass)
    head_only = attention_mass(q, k, sel, torch.tensor([True, False, False, False]))  # causal: sees token 0 only
    assert head_only.tolist() == [2.0, 0.0, 0.0, 0.0]


def test_config_checks() -> None:
    assert BlendConfig().check_layer == 2
    assert set(DEVIATIONS) == {"kv", "k", "v", "kv_head_norm"}
    with pytest.raises(InvalidInput, match="deviation"):
        BlendConfig(deviation="hidden")
    for bad in (-1, 1.5):
        with pytest.raises(InvalidInput, match="sink_tokens"):
            BlendConfig(sink_tokens=bad)  # type: ignore[arg-type]
    for bad_w in (-1.0, float("inf"), float("nan"), "1"):
        with pytest.raises(InvalidInput, match="attention_weight"):
            BlendConfig(attention_weight=bad_w)  # type: ignore[arg-type]
    for bad_f in (-0.1, 1.5, float("nan"), "1"):
        with pytest.raises(InvalidInput, match="influence"):
            BlendConfig(influence=bad_f)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="attention_per_head"):
        BlendConfig(attention_per_head=1)  # type: ignore[arg-type]
