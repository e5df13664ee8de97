"""Drift correction: the passage's shared drift, estimated from its recomputed tokens, moves the others."""

from __future__ import annotations

import pytest
import torch

from kvstore.blend.blender import Blender
from kvstore.blend.config import BlendConfig
from kvstore.blend.drift import MIN_TOKENS, DriftPlan
from kvstore.blend.rope import RopeSpec, apply_rope, shift_angles
from kvstore.errors import InvalidInput
from tests.blend.helpers import full_logits, kl, prompt_ids, rag_segments
from tests.models.real_model import model_threads, require_model  # noqa: F401  (autouse fixture)

HEADS, DIM = 3, 64


def _prompt(rope: RopeSpec, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Uncached head of 4, passage 0 at 4..103, passage 1 at 104..183, uncached tail of 6: T = 190.

    Fresh keys are the reused ones plus a passage-wide position-free drift rotated to each position, plus noise on
    a few tokens (outliers the median must ignore); the opening token of each passage drifts wildly.
    """
    total = 190
    passage_of = torch.full((total,), -1, dtype=torch.long)
    passage_of[4:104] = 0
    passage_of[104:184] = 1
    reused = passage_of >= 0
    old_free = torch.randn(total, HEADS, DIM, generator=gen)
    drift = torch.randn(2, HEADS, DIM, generator=gen)
    fresh_free = old_free.clone()
    fresh_free[4:104] += drift[0]
    fresh_free[104:184] += drift[1]
    fresh_free[[4, 104]] += 100.0  # the openings: their drift is of another kind
    fresh_free[[10, 20, 110]] += 50.0 * torch.randn(3, HEADS, DIM, generator=gen)
    positions = torch.arange(total)
    old_k = apply_rope(old_free, positions, rope).transpose(0, 1)[None]  # [1, heads, T, dim]
    fresh_k = apply_rope(fresh_free, positions, rope).transpose(0, 1)[None]
    old_v = torch.randn(1, HEADS, total, DIM, generator=gen)
    fresh_v = old_v + 1.0
    return {"passage_of": passage_of, "reused": reused, "old_k": old_k, "fresh_k": fresh_k, "old_v": old_v,
            "fresh_v": fresh_v, "drift": drift}


@pytest.mark.parametrize("variant", ["neox", "gptj"])
def test_shared_drift_is_estimated_position_free_and_applied_at_each_position(variant: str) -> None:
    rope = RopeSpec.standard(DIM, 10000.0, variant)  # type: ignore[arg-type]
    p = _prompt(rope, torch.Generator().manual_seed(5))
    total = p["reused"].numel()
    # computed: the uncached tokens, both openings, 30 of passage 0 (outliers 10, 20 among them), 20 of passage 1
    sel = torch.tensor(sorted({0, 1, 2, 3, 4, 104, *range(6, 66, 2), *range(106, 146, 2), *range(184, 190)}))
    cos, sin = shift_angles(rope, torch.arange(total))
    plan = DriftPlan.build(sel, p["reused"], p["passage_of"], cos, sin, rope)
    keys, values = p["old_k"].clone(), p["old_v"].clone()
    old_k, old_v = plan.old(keys, values)
    keys[:, :, sel], values[:, :, sel] = p["fresh_k"][:, :, sel], p["fresh_v"][:, :, sel]
    plan.apply(keys, values, p["fresh_k"][:, :, sel], p["fresh_v"][:, :, sel], old_k, old_v, 1.0, False)
    stale = p["reused"].clone()
    stale[sel] = False
    # share 1: every stale key lands on its fresh key (median of the exact shared drift, outliers and openings aside)
    torch.testing.assert_close(keys[:, :, stale], p["fresh_k"][:, :, stale], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values, torch.where(stale[None, None, :, None], p["old_v"], p["fresh_v"]))
    # share 0.5 moves half way; values move too when asked
    keys, values = p["old_k"].clone(), p["old_v"].clone()
    plan.apply(keys, values, p["fresh_k"][:, :, sel], p["fresh_v"][:, :, sel], old_k, old_v, 0.5, True)
    half = (p["old_k"] + p["fresh_k"]) / 2
    torch.testing.assert_close(keys[:, :, stale], half[:, :, stale], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values[:, :, stale], p["old_v"][:, :, stale] + 0.5)
    assert torch.equal(keys[:, :, ~stale], p["old_k"][:, :, ~stale])  # computed and uncached positions untouched


def test_a_passage_with_too_few_recomputed_tokens_is_left_alone() -> None:
    rope = RopeSpec.standard(DIM, 10000.0)
    p = _prompt(rope, torch.Generator().manual_seed(6))
    total = p["reused"].numel()
    few = list(range(106, 106 + 2 * (MIN_TOKENS - 1), 2))  # MIN_TOKENS - 1 of passage 1, plus its opening
    sel = torch.tensor(sorted({0, 1, 2, 3, *range(4, 4 + MIN_TOKENS + 1), 104, *few, *range(184, 190)}))
    cos, sin = shift_angles(rope, torch.arange(total))
    plan = DriftPlan.build(sel, p["reused"], p["passage_of"], cos, sin, rope)
    keys, values = p["old_k"].clone(), p["old_v"].clone()
    old = plan.old(keys, values)
    plan.apply(keys, values, p["fresh_k"][:, :, sel], p["fresh_v"][:, :, sel], *old, 1.0, False)
    assert torch.equal(keys[:, :, 150], p["old_k"][:, :, 150])  # passage 1: too few to estimate, unchanged
    assert not torch.equal(keys[:, :, 80], p["old_k"][:, :, 80])  # passage 0: MIN_TOKENS after its opening


def test_plan_refuses_tensors_of_another_prompt() -> None:
    rope = RopeSpec.standard(DIM, 10000.0)
    cos, sin = shift_angles(rope, torch.arange(10))
    with pytest.raises(InvalidInput, match="one entry per position"):
        DriftPlan.build(torch.arange(4), torch.ones(12, dtype=torch.bool), torch.zeros(12, dtype=torch.long), cos,
                        sin, rope)


@pytest.mark.parametrize("bad", [{"drift": -0.1}, {"drift": 1.5}, {"drift": True}, {"drift": "0.5"},
                                 {"drift_values": 1}])
def test_config_refuses_bad_drift(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidInput, match="drift"):
        BlendConfig(**bad)  # type: ignore[arg-type]


def test_drift_lowers_the_error_of_a_real_blend() -> None:
    """4 x 256-token doc passages + a FAQ question, r = 0.15: the answer's KL against a full prefill falls."""
    lm = require_model()
    segs, answer = rag_segments(lm, tokens=256, count=4)
    ids, answer = prompt_ids(segs), answer[:32]
    ref = full_logits(lm, ids, answer)
    kls = {}
    for share in (0.0, 0.5):
        result = Blender(lm.model, BlendConfig(ratio=0.15, drift=share)).blend(segs)  # type: ignore[arg-type]
        with torch.inference_mode():
            rest = lm.model(input_ids=torch.tensor([answer[:-1]]), past_key_values=result.cache(lm.model.config))
        kls[share] = kl(ref, torch.cat([result.logits[None], rest.logits[0]]))
    assert kls[0.5] < 0.95 * kls[0.0], kls
    # full recompute leaves nothing stale: still exact with the correction on
    exact = Blender(lm.model, BlendConfig(ratio=1.0)).blend(segs)  # type: ignore[arg-type]
    torch.testing.assert_close(exact.logits, ref[0], atol=2e-4, rtol=1e-4)
