"""The quality harness on the real model: identity is exact, damage is measured, definitions hold."""

from __future__ import annotations

import math

import pytest
import torch

from kvstore.errors import InvalidInput, ShapeMismatch
from kvstore.models.prompts import sample_passages
from kvstore.quality import KVTransform, QualityHarness, QualityReport, measure_quality
from tests.models.real_model import model_threads, require_model  # noqa: F401  (autouse fixture)

CONTEXT, CONTINUATION, GREEDY = 256, 32, 8


@pytest.fixture(scope="module")
def harness() -> QualityHarness:
    loaded = require_model()
    passage = sample_passages(loaded.tokenizer, tokens=CONTEXT + CONTINUATION, count=1, seed=0)[0]
    ids = list(passage.token_ids)
    return QualityHarness(loaded, ids[:CONTEXT], ids[CONTEXT:], greedy_tokens=GREEDY)


def _noise(scale: float, seed: int = 0) -> KVTransform:
    def transform(kv: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return kv + scale * kv.abs().mean() * torch.randn(kv.shape, generator=gen)

    return transform


def test_identity_is_exact(harness: QualityHarness) -> None:
    report = harness.evaluate(lambda kv: kv)
    assert report.context_tokens == CONTEXT
    assert report.scored_positions == CONTINUATION - 1
    assert report.kl_mean == pytest.approx(0.0, abs=1e-9)
    assert report.kl_max == pytest.approx(0.0, abs=1e-9)
    assert report.top1_agreement == 1.0
    assert report.ppl_delta == pytest.approx(0.0, abs=1e-9)
    assert report.greedy_match == report.greedy_tokens == GREEDY
    assert 1.0 < report.ppl_reference < 100.0  # real weights on real text


def test_noise_is_measured_and_grows_with_scale(harness: QualityHarness) -> None:
    small = harness.evaluate(_noise(0.05))
    large = harness.evaluate(_noise(0.5))
    assert 0.0 < small.kl_mean < large.kl_mean
    assert small.kl_mean <= small.kl_max
    assert large.top1_agreement < 1.0
    assert large.ppl_test != large.ppl_reference
    assert small.ppl_reference == large.ppl_reference


def test_bf16_storage_costs_far_less_than_noise(harness: QualityHarness) -> None:
    bf16 = harness.evaluate(lambda kv: kv.to(torch.bfloat16))
    noisy = harness.evaluate(_noise(0.5))
    assert 0.0 < bf16.kl_mean < 1e-3
    assert bf16.kl_mean < noisy.kl_mean / 100
    assert bf16.top1_agreement >= 0.9


def test_transforms_cannot_damage_the_reference(harness: QualityHarness) -> None:
    before = harness.reference_kv.clone()
    harness.evaluate(lambda kv: kv.mul_(0.0))
    assert torch.equal(harness.reference_kv, before)
    assert harness.evaluate(lambda kv: kv).kl_mean == pytest.approx(0.0, abs=1e-9)


def test_destroyed_context_loses_the_greedy_match(harness: QualityHarness) -> None:
    report = harness.evaluate(lambda kv: torch.zeros_like(kv))
    assert report.kl_mean > 0.1
    assert report.greedy_match < GREEDY or report.top1_agreement < 1.0


def test_perplexity_matches_a_plain_full_forward(harness: QualityHarness) -> None:
    """No cache at all: one forward over context + continuation gives the same reference numbers."""
    model = harness.loaded.model
    ids = torch.tensor([harness.context + harness.continuation])
    with torch.inference_mode():  # logits of the last C positions: inputs c[0] .. c[C-1]
        logits = model(input_ids=ids, logits_to_keep=CONTINUATION).logits[0].double()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)  # input c[i] predicts c[i+1]
    targets = torch.tensor(harness.continuation[1:])
    ppl = math.exp(float(-logprobs.gather(1, targets.unsqueeze(1)).mean()))
    report = harness.evaluate(lambda kv: kv)
    assert report.ppl_reference == pytest.approx(ppl, rel=1e-4)


def test_greedy_probe_is_the_reference_greedy_decode(harness: QualityHarness) -> None:
    model = harness.loaded.model
    probe = harness.greedy_inputs
    assert len(probe) == GREEDY and probe[0] == harness.continuation[0]
    ids = torch.tensor([harness.context + probe])
    with torch.inference_mode():
        argmax = model(input_ids=ids, logits_to_keep=GREEDY).logits[0, :-1].argmax(-1)
    assert argmax.tolist() == probe[1:]


def test_bad_inputs_are_rejected(harness: QualityHarness) -> None:
    with pytest.raises(ShapeMismatch):
        harness.evaluate(lambda kv: kv[:, :, :-1])
    with pytest.raises(InvalidInput):
        QualityHarness(harness.loaded, [], harness.continuation)
    with pytest.raises(InvalidInput, match="positions"):
        QualityHarness(harness.loaded, [1] * 8190, [1, 2, 3])


def test_report_serializes() -> None:
    report = QualityReport(
        context_tokens=2048,
        scored_positions=255,
        kl_mean=0.01,
        kl_max=0.2,
        top1_agreement=0.98,
        ppl_reference=5.0,
        ppl_test=5.25,
        greedy_tokens=32,
        greedy_match=30,
    )
    assert report.ppl_delta == pytest.approx(0.25)
    assert report.to_dict()["ppl_delta"] == pytest.approx(0.25)
    assert "greedy match 30/32" in report.summary()


@pytest.mark.slow
def test_long_context_bf16_report() -> None:
    """The recommended sizes: 2048 context tokens, 256 continuation tokens (about a minute)."""
    loaded = require_model()
    passage = sample_passages(loaded.tokenizer, tokens=2048 + 256, count=1, seed=1)[0]
    ids = list(passage.token_ids)
    report = measure_quality(loaded, ids[:2048], ids[2048:], lambda kv: kv.to(torch.bfloat16))
    print(passage.document, report.summary())
    assert report.scored_positions == 255
    assert report.kl_mean < 1e-3 and report.top1_agreement >= 0.95
