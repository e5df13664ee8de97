"""`kvstore bench codecs`: cachegen's calibrated setup, the JSON keys, and the int8 row.

Fast, in-process, on the real model with tiny prompts: the default setup
calibrates a per-head transform on prompts other than the scored ones and
un-rotates keys; the measured and calibration prompts are disjoint;
``--uncalibrated`` gives the plain levels; the calibrated codecs of one level
(shared profile at 256 tokens, inline tables at 2048) decode to the same
values but for float rounding; the report holds every key the issue asks for under the default
level; the int8 row is the codec's default int8. The end-to-end CLI run is in
tests/test_bench_codecs.py.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from kvstore.benchmarks import codecs_measure as m
from kvstore.benchmarks.codecs import CodecsBenchConfig, add_arguments
from kvstore.benchmarks.codecs_run import build_report, split_prompts
from kvstore.benchmarks.codecs_variants import (
    CALIBRATION_DRAWS,
    CachegenSetup,
    Variant,
    cachegen_codecs,
    cachegen_setup,
    variants,
)
from kvstore.codecs.base import ChunkLayout, make_codec
from kvstore.codecs.cachegen_bench import prefill_kv, to_chunks
from kvstore.codecs.cachegen_calibrate import rope_theta_of
from kvstore.codecs.cachegen_params import DEFAULT_LEVEL
from kvstore.codecs.quant import INT8_DEFAULT_EXACT_TOKENS
from kvstore.errors import InvalidInput
from kvstore.models import LoadedModel
from tests.models.real_model import model_threads, require_model

__all__ = ["model_threads"]

REQUIRED = (
    "cachegen_ratio_2048", "cachegen_ratio_256", "cachegen_ppl_delta", "cachegen_top1", "int8_ratio",
    "int8_top1", "int4_ratio", "int4_ppl_delta", "cachegen_cpu_decode_mbps",
)  # fmt: skip
TEXT = (
    "The tiered store keeps recent chunks in memory and older ones on disk. "
    "Each chunk holds the keys and values of a few hundred tokens of a prompt. "
)
DEFAULT = next(v for v in variants() if v.alias == "cachegen")


def _ids(loaded: LoadedModel, n: int, skip: int = 0) -> list[int]:
    ids: list[int] = loaded.tokenizer(TEXT * 40)["input_ids"]
    assert len(ids) >= skip + n
    return ids[skip : skip + n]


def _parse(*flags: str) -> CodecsBenchConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return CodecsBenchConfig.from_args(parser.parse_args(list(flags)))


def test_calibrated_is_the_default_and_uncalibrated_a_flag() -> None:
    assert CodecsBenchConfig().calibrated
    assert _parse().calibrated and _parse("--quick").calibrated
    assert not _parse("--uncalibrated").calibrated


@pytest.fixture(scope="module")
def calibrated() -> tuple[LoadedModel, list[int], CachegenSetup]:
    """The model, a calibration prompt (256 context + 16 continuation tokens) and its default setup."""
    loaded = require_model()
    ids = _ids(loaded, 272)  # a repetitive text: this checks the plumbing, not quality
    return loaded, ids, cachegen_setup(loaded, [(ids[:256], ids[256:])])


def test_default_setup_calibrates_and_unrotates_keys(
    calibrated: tuple[LoadedModel, list[int], CachegenSetup],
) -> None:
    loaded, ids, setup = calibrated
    calib = [(ids[:256], ids[256:])]
    spec = loaded.spec_for("bfloat16")
    assert setup.calibrated and setup.transform is not None and setup.sensitivity is None
    t = setup.transform
    assert (t.slabs, t.heads, t.head_dim) == (spec.num_layers * 2, spec.num_kv_heads, spec.head_dim)
    assert setup.rope_theta == rope_theta_of(loaded) > 1.0
    plain = cachegen_setup(loaded, calib, calibrated=False)
    assert plain == CachegenSetup(None, 0.0) and not plain.calibrated and plain.transform is None
    assert CachegenSetup(None, 0.0, t).calibrated

    kvs = [prefill_kv(loaded, ids) for ids, _ in calib]
    chosen = cachegen_codecs(DEFAULT, setup, kvs, spec)
    assert chosen.profile.transform == t and chosen.profile.rope_theta == setup.rope_theta
    assert chosen.stored.params["profile"] == chosen.profile.digest
    assert chosen.stored.params["rope_theta"] == setup.rope_theta
    assert chosen.inline.params["profile_tables"] is False
    # a chunk the profile never saw: both codecs quantize with the same calibrated steps, so they
    # decode to the same values but for float rounding (the inverse transform skips the components
    # an inline table holds constant, summing their terms in another order)
    kv = prefill_kv(loaded, _ids(loaded, 64, skip=300))
    raw = to_chunks(kv, 64)[0]
    layout = ChunkLayout(spec, 64)
    outs = []
    for codec in (chosen.stored, chosen.inline):
        blob = codec.encode(raw, layout)
        out = np.empty(layout.nbytes, np.uint8)
        codec.decode_into(blob, out)
        outs.append(out)
    a, b = (torch.from_numpy(o).view(torch.bfloat16).float() for o in outs)
    assert (a != b).float().mean() < 0.01
    # one bf16 ulp, or a rounding difference near zero (the codec's own error is ~0.4 per value)
    assert torch.all((a - b).abs() <= 2.0**-7 * torch.maximum(a.abs(), b.abs()) + 1e-3)
    assert len(chosen.stored.encode(raw, layout)) < len(chosen.inline.encode(raw, layout))  # no tables

    uncal = cachegen_codecs(DEFAULT, plain, kvs, spec)
    assert uncal.profile.sensitivity is None and uncal.profile.transform is None
    assert uncal.profile.rope_theta == 0.0
    assert uncal.inline.params.get("rope_theta", 0.0) == 0.0
    assert uncal.inline.params == make_codec("cachegen", DEFAULT.params).params
    blob = uncal.stored.encode(raw, layout)
    out = np.empty(layout.nbytes, np.uint8)
    uncal.stored.decode_into(blob, out)
    assert not np.array_equal(out, outs[0])  # calibration changed the steps


def test_measure_variant_uses_the_setup(calibrated: tuple[LoadedModel, list[int], CachegenSetup]) -> None:
    loaded, calib_ids, setup = calibrated
    spec = loaded.spec_for("bfloat16")
    scored = _ids(loaded, 264, skip=300)
    harness = m.StoredKVHarness(loaded, scored[:256], scored[256:], greedy_tokens=2)
    inputs = m.Inputs(spec, [harness], [prefill_kv(loaded, calib_ids[:256])], 1, 0, setup)
    r = m.measure_variant(DEFAULT, inputs)
    assert r.ratio_256_own_tables is not None
    assert r.ratio_256 > r.ratio_256_own_tables > 3.0  # the shared profile saves the tables
    assert r.ratio_2048 == pytest.approx(r.ratio_256_own_tables)  # one 256-token chunk here
    assert r.quality.kl > 0.0 and r.speed.decode_mbps > 0  # tiny repetitive prompts: no quality bound
    assert r.profile_bytes is not None and r.profile_bytes > 0


def test_calibration_prompts_are_held_out() -> None:
    ids = [[i] * 4 for i in range(10)]  # 5 passages, then 5 chats
    measured, calibration = split_prompts(ids, 6, 4)
    assert measured == [[0] * 4, [1] * 4, [2] * 4, [5] * 4, [6] * 4, [7] * 4]
    assert calibration == [[3] * 4, [4] * 4, [8] * 4, [9] * 4]
    with pytest.raises(InvalidInput, match="held out"):
        split_prompts([[0] * 4, [1] * 4, [2] * 4, [0] * 4], 2, 2)  # the same text drawn twice
    with pytest.raises(InvalidInput, match="could not draw 6 \\+ 4 prompts of 2304 tokens"):
        split_prompts(ids[:3], 6, 4, 2304)


def _result(variant: Variant, ratio: float, top1: float) -> m.VariantResult:
    q = m.Quality(kl=1e-4, top1=top1, ppl_delta=0.01, greedy_match=2.0)
    s = m.Speed(10.0, 20.0, 100.0, 200.0)
    own = ratio * 0.9 if variant.profile else None
    return m.VariantResult(variant, ratio * 0.95, ratio, own, q, s, None, 1000 if variant.profile else None)


def test_report_has_every_required_key_for_the_default_level() -> None:
    by_key = {v.key: v for v in variants()}
    results = [
        _result(by_key["int8"], 1.93, 0.996), _result(by_key["int4"], 3.7, 0.95),
        _result(by_key["cachegen_l0"], 4.0, 0.98), _result(DEFAULT, 4.5, 0.97),
    ]  # fmt: skip
    config = CodecsBenchConfig(prompts=1, context=256, continuation=16, iters=1, warmup=0)
    fp32 = m.Quality(1e-6, 1.0, 0.0, 2.0)
    report = build_report(config, results, fp32, 5.0, (1.27, 1.27), 100000.0)
    values = json.loads(report.json_line())
    for key in REQUIRED:
        assert isinstance(values[key], float), key
    assert values["cachegen_ratio_256"] == 4.5 and values["cachegen_top1"] == 0.97
    assert values["cachegen_ratio_2048"] == values[f"cachegen_l{DEFAULT_LEVEL}_ratio_2048"]
    assert values["cachegen_cpu_decode_mbps"] == 20.0
    assert values["int8_ratio"] == 1.93 and values["int8_top1"] == 0.996
    assert values["cachegen_calibrated"] is True and values["calibration_draws"] == CALIBRATION_DRAWS
    assert values["cachegen_rope_theta"] == 100000.0
    assert any("calibrated: per-head Fisher-weighted transform" in n for n in report.notes)


def test_int8_row_is_the_default_int8() -> None:
    int8 = next(v for v in variants() if v.key == "int8")
    assert make_codec(int8.codec, int8.params).params == make_codec("quant").params
    assert make_codec("quant").params["exact_tokens"] == INT8_DEFAULT_EXACT_TOKENS
