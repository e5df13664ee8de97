"""RoPE re-rotation: shifting a key equals computing it at the new position."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from kvstore.blend.passages import compute_passage_kv
from kvstore.blend.rope import RopeScalingUnsupported, RopeSpec, rope_from_model, shift_keys, shift_keys_into
from kvstore.errors import InvalidInput, ShapeMismatch
from tests.models.real_model import model_threads, require_model  # noqa: F401  (autouse fixture)


def test_neox_shift_equals_recompute_on_the_real_model() -> None:
    lm = require_model()
    ids = lm.encode("Lists are mutable sequences, typically used to store collections of items. " * 8)[:80]
    at_p = compute_passage_kv(lm.model, ids, start_position=7)
    at_q = compute_passage_kv(lm.model, ids, start_position=391)
    rope = rope_from_model(lm.model)
    assert rope.variant == "neox" and rope.rotary_dim == 64
    scale = float(at_q.kv[:, 0].abs().max())
    moved = shift_keys(at_p.kv[:, 0], 391 - 7, rope)
    assert float((moved - at_q.kv[:, 0]).abs().max()) < 2e-5 * scale
    back = shift_keys(at_q.kv[:, 0], 7 - 391, rope)
    assert float((back - at_p.kv[:, 0]).abs().max()) < 2e-5 * scale
    assert float((at_p.kv[:, 0] - at_q.kv[:, 0]).abs().max()) > 0.1 * scale  # the shift matters
    torch.testing.assert_close(at_p.kv[:, 1], at_q.kv[:, 1], atol=5e-4, rtol=1e-4)  # values carry no position


def _direct(keys: torch.Tensor, positions: torch.Tensor, theta: float, interleaved: bool) -> torch.Tensor:
    """RoPE written out pair by pair in float64 (over float32 frequencies, as models keep them)."""
    d = keys.shape[-1]
    inv = (theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)).float().double()
    ang = positions.double()[:, None, None] * inv  # [tokens, 1, d/2]
    x = keys.double()
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x[..., : d // 2], x[..., d // 2 :]
    ra, rb = a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()
    out = torch.empty_like(x)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., : d // 2], out[..., d // 2 :] = ra, rb
    return out.float()


@pytest.mark.parametrize("variant", ["gptj", "neox"])
def test_shift_matches_direct_formula(variant: str) -> None:
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(2, 40, 3, 64, generator=g)  # [layers, tokens, heads, head_dim]
    p = torch.arange(40) + 11
    q = torch.arange(40) * 3 + 1000  # per-token shifts, of both signs relative to each other
    rope = RopeSpec.standard(64, 1e5, variant)  # type: ignore[arg-type]
    at_p = _direct(raw, p, 1e5, variant == "gptj")
    at_q = _direct(raw, q, 1e5, variant == "gptj")
    torch.testing.assert_close(shift_keys(at_p, q - p, rope), at_q, atol=2e-5, rtol=1e-5)
    wrong = "neox" if variant == "gptj" else "gptj"
    other = shift_keys(at_p, q - p, RopeSpec.standard(64, 1e5, wrong))  # type: ignore[arg-type]
    assert float((other - at_q).abs().max()) > 0.1


def _with_rope(model: object, params: dict[str, object]) -> SimpleNamespace:
    cfg = copy.deepcopy(model.config)  # type: ignore[attr-defined]
    cfg.rope_parameters = params
    return SimpleNamespace(config=cfg, model=model.model)  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["dynamic", "longrope", "made-up"])
def test_refused_rope_scaling(kind: str) -> None:
    lm = require_model()
    with pytest.raises(RopeScalingUnsupported, match=kind):
        rope_from_model(_with_rope(lm.model, {"rope_type": kind, "rope_theta": 1e5, "factor": 2.0}))  # type: ignore[arg-type]


def test_linear_scaling_uses_the_models_frequencies() -> None:
    lm = require_model()
    rope = rope_from_model(_with_rope(lm.model, {"rope_type": "linear", "rope_theta": 1e5, "factor": 2.0}))  # type: ignore[arg-type]
    assert torch.equal(rope.inv_freq, lm.model.model.rotary_emb.inv_freq.float())


def test_bad_rope_inputs() -> None:
    rope = RopeSpec.standard(64, 1e4)
    with pytest.raises(ShapeMismatch):
        shift_keys(torch.zeros(4, 3, 32), 1, rope)
    with pytest.raises(ShapeMismatch):
        shift_keys(torch.zeros(4, 3, 64), torch.arange(5), rope)
    with pytest.raises(InvalidInput):
        RopeSpec("alibi", rope.inv_freq, 64, 64)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        RopeSpec("neox", rope.inv_freq, 64, 63)


@pytest.mark.parametrize(("variant", "rotary_dim"), [("neox", 64), ("gptj", 64), ("neox", 32)])
def test_shift_into_a_view_equals_shift_keys(variant: str, rotary_dim: int) -> None:
    g = torch.Generator().manual_seed(5)
    exps = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    rope = RopeSpec(variant, (1.0 / 1e5**exps).float(), 64, rotary_dim)  # type: ignore[arg-type]
    src = torch.randn(2, 40, 3, 64, generator=g)  # [layers, tokens, heads, head_dim]
    for keys in (src, src.to(torch.bfloat16)):
        out = torch.full((2, 100, 3, 64), 7.0)
        shift_keys_into(out[:, 30:70], keys, 123, rope)
        torch.testing.assert_close(out[:, 30:70], shift_keys(keys.float(), 123, rope), atol=0, rtol=0)
        assert bool((out[:, :30] == 7.0).all()) and bool((out[:, 70:] == 7.0).all())
    with pytest.raises(ShapeMismatch):
        shift_keys_into(torch.zeros(2, 39, 3, 64), src, 1, rope)
