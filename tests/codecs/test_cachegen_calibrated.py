"""cachegen with calibrated steps: sensitivity profiles, steps from them, the calibration itself.

Synthetic KV for the format checks (tests/codecs/test_cachegen.py's helpers);
the real SmolLM2 model for the calibration and for the quality of calibrated
steps on a short context.
"""

from __future__ import annotations

from functools import partial

import msgpack
import numpy as np
import pytest
import torch

import kvstore.codecs  # noqa: F401  # registers the codecs
from kvstore.codecs.base import ChunkLayout, CodecParams
from kvstore.codecs.cachegen import CachegenCodec
from kvstore.codecs.cachegen_bench import prefill_kv
from kvstore.codecs.cachegen_calibrate import calibrate, rope_theta_of
from kvstore.codecs.cachegen_coder import available, rangecoder
from kvstore.codecs.cachegen_params import LEVEL_LAMBDA, LEVEL_ROUNDING, CachegenParams
from kvstore.codecs.cachegen_profile import CachegenProfile, build_profile
from kvstore.codecs.container import unpack
from kvstore.errors import CodecError, InvalidInput
from kvstore.models.prompts import sample_passages
from kvstore.quality import QualityHarness, QualityReport
from tests.codecs.test_cachegen import decode, kv, raw, real_chunks, section, spec, steps
from tests.models.real_model import model_threads, require_model  # noqa: F401  (autouse fixture)

pytestmark = pytest.mark.skipif(
    not available(), reason="kvstore._rangecoder is not built (needs a C compiler)"
)


def decoded_float(codec: CachegenCodec, blob: bytes, layout: ChunkLayout, _: torch.Tensor) -> torch.Tensor:
    """A KV transform that ignores its input and returns ``blob`` decoded, as float32."""
    return decode(codec, blob, layout).float()


def bf16_up(x: np.ndarray) -> np.ndarray:
    """float32 values rounded up to bfloat16 (positive inputs), as float32."""
    u = x.astype(np.float32).view(np.uint32).astype(np.int64)
    up = np.where(u & 0xFFFF, u + 0x10000, u) & 0xFFFF0000
    return up.astype(np.uint32).view(np.float32)


@pytest.fixture(scope="module")
def calibrated() -> tuple[ChunkLayout, np.ndarray, CachegenProfile]:
    layout = ChunkLayout(spec(layers=2, heads=2, dim=32), 128)
    channels = 2 * 2 * 64
    wanted = 0.5 * np.exp(np.random.default_rng(0).uniform(-2.5, 0.5, channels))  # steps of level 1
    sensitivity = (LEVEL_LAMBDA[1] / wanted) ** 2
    samples = [(raw(kv(layout, seed=200 + i, channel_seed=0)), layout) for i in range(2)]
    return layout, sensitivity, build_profile(samples, CachegenParams(level=1), sensitivity=sensitivity)


def test_sensitivity_sets_the_steps(calibrated: tuple[ChunkLayout, np.ndarray, CachegenProfile]) -> None:
    layout, sensitivity, profile = calibrated
    codec = CachegenCodec({"profile": profile.digest, "token_scale": False}, profiles=[profile])
    x = kv(layout, seed=3, channel_seed=0)
    c = unpack(codec.encode(raw(x), layout))
    got = steps(c, layout)[:, :, 0].reshape(-1).numpy()
    target = (LEVEL_LAMBDA[1] / np.sqrt(sensitivity.astype(np.float32).astype(np.float64))).astype(np.float32)
    span = x.float()[:, :, 1:].reshape(4, 127, -1)
    dev = (span - span.mean(dim=1, keepdim=True)).abs().amax(dim=1).reshape(-1).numpy() / 127
    free = target > 1.05 * dev  # channels whose step is not raised to fit 255 symbols
    assert free.sum() > 100
    assert np.array_equal(got[free], bf16_up(target[free]))
    plain = steps(unpack(CachegenCodec({"token_scale": False}).encode(raw(x), layout)), layout)
    plain = plain[:, :, 0].reshape(-1).numpy()
    assert not np.allclose(got, plain)  # a profile with a sensitivity changes the values, not only the size


def test_profile_tables_off_names_no_profile(
    calibrated: tuple[ChunkLayout, np.ndarray, CachegenProfile],
) -> None:
    layout, _, profile = calibrated
    x = kv(layout, seed=4, channel_seed=0)
    shared = CachegenCodec({"profile": profile.digest}, profiles=[profile])
    inline = CachegenCodec({"profile": profile.digest, "profile_tables": False}, profiles=[profile])
    a, b = shared.encode(raw(x), layout), inline.encode(raw(x), layout)
    assert unpack(a).params["profile"] == profile.digest and unpack(b).params["profile"] == ""
    assert section(unpack(a), "tab_n").count(0) > 0 and section(unpack(b), "tab_n").count(0) == 0
    assert torch.equal(decode(shared, a, layout), decode(CachegenCodec(), b, layout))
    assert inline.params["profile_tables"] is False and "profile_tables" not in shared.params
    with pytest.raises(InvalidInput):
        CachegenCodec({"profile_tables": 1})


def test_sensitivity_profile_blob(calibrated: tuple[ChunkLayout, np.ndarray, CachegenProfile]) -> None:
    layout, sensitivity, profile = calibrated
    again = CachegenProfile.from_bytes(profile.to_bytes())
    assert again == profile and again.digest == profile.digest
    assert again.sensitivity is not None
    assert np.array_equal(again.sensitivity, sensitivity.astype(np.float32).astype(np.float64))
    assert msgpack.unpackb(profile.to_bytes())["version"] == 2
    tables_only = CachegenProfile(
        profile.level,
        profile.layer_ramp,
        profile.slabs,
        profile.channels,
        profile.lo,
        profile.n,
        profile.freq,
    )
    assert msgpack.unpackb(tables_only.to_bytes())["version"] == 1 and tables_only.sensitivity is None
    for bad in (
        b"\x00" * 8,
        np.full(len(sensitivity), np.nan, "<f4").tobytes(),
        np.zeros(len(sensitivity), "<f4").tobytes(),
    ):
        forged = CachegenProfile(
            profile.level,
            profile.layer_ramp,
            profile.slabs,
            profile.channels,
            profile.lo,
            profile.n,
            profile.freq,
            bad,
        )
        with pytest.raises(CodecError, match="sensitivity"):
            CachegenProfile.from_bytes(forged.to_bytes())
    with pytest.raises(InvalidInput):
        build_profile([(raw(kv(layout)), layout)], CachegenParams(), sensitivity=sensitivity[:-1])
    with pytest.raises(InvalidInput):
        build_profile([(raw(kv(layout)), layout)], CachegenParams(), sensitivity=-sensitivity)


def test_rounding_offset_widens_the_zero_bin() -> None:
    rc = rangecoder()
    u = np.array([0.0, 0.3, 0.49, 0.5, 0.7, -0.7, 0.76, 1.49, 1.5, -1.6, 200.0, -200.0], np.float32)
    src = np.concatenate([[0.0], u]).astype(np.float32)  # token 0 is exact; mean forced to 0 below
    qp = np.array([0, 0x3F80], "<u2").tobytes()  # mean 0, step 1.0
    want = {128: [0, 0, 0, 1, 1, -1, 1, 1, 2, -2, 127, -127], 64: [0, 0, 0, 0, 0, 0, 1, 1, 1, -1, 127, -127]}
    for rounding, q in want.items():
        sym, *_ = rc.quantize(src.tobytes(), 2, 1, len(src), 1, 1, qp, rounding, None, None, None)
        assert [s - 127 for s in sym] == q, rounding
    with pytest.raises(ValueError):
        rc.quantize(src.tobytes(), 2, 1, len(src), 1, 1, qp, 129, None, None, None)
    assert all(0 <= r <= 128 for r in LEVEL_ROUNDING.values())


# ---------------------------------------------------------------- the real model


def test_calibrate_real_model() -> None:
    """Sensitivities of SmolLM2 from one short prompt: one per (slab, channel), positive, far from uniform."""
    loaded = require_model()
    ids = list(sample_passages(loaded.tokenizer, tokens=160, count=1, seed=5)[0].token_ids)
    w = calibrate(loaded, [(ids[:128], ids[128:])], draws=1)
    spec_ = loaded.spec_for("bfloat16")
    assert w.shape == (spec_.num_layers * 2 * spec_.num_kv_heads * spec_.head_dim,)
    assert np.isfinite(w).all() and (w > 0).all()
    per_slab = w.reshape(spec_.num_layers, 2, -1).mean(axis=2)
    assert per_slab.max() / per_slab.min() > 10
    with pytest.raises(InvalidInput):
        calibrate(loaded, [(ids[:1], ids[1:])])
    with pytest.raises(InvalidInput):
        calibrate(loaded, [])


@pytest.mark.slow
def test_real_kv_calibrated_steps() -> None:
    """Calibrated on one prompt, measured on another: about the size of uncalibrated level 1, lower KL."""
    loaded = require_model()
    passages = sample_passages(loaded.tokenizer, tokens=544, count=2, seed=6)
    calib_ids, ids = list(passages[0].token_ids), list(passages[1].token_ids)
    spec_ = loaded.spec_for("bfloat16")
    sensitivity = calibrate(loaded, [(calib_ids[:512], calib_ids[512:])], draws=1)
    harness = QualityHarness(loaded, ids[:512], ids[512:], greedy_tokens=0)
    layout = ChunkLayout(spec_, 512)
    theta = rope_theta_of(loaded)
    params = CachegenParams(level=2, rope_theta=theta)
    samples = [(c, layout) for c in real_chunks(prefill_kv(loaded, calib_ids[:512]), 512)]
    profile = build_profile(samples, params, sensitivity=sensitivity)
    config: CodecParams = {
        "level": 2,
        "rope_theta": theta,
        "profile": profile.digest,
        "profile_tables": False,
    }
    chunk = real_chunks(harness.reference_kv, 512)[0]
    results: dict[str, tuple[float, QualityReport]] = {}
    for name, codec in [
        ("plain", CachegenCodec()),
        ("calibrated", CachegenCodec(config, profiles=[profile])),
    ]:
        blob = codec.encode(chunk, layout)
        report = harness.evaluate(partial(decoded_float, codec, blob, layout))
        results[name] = (layout.nbytes / len(blob), report)
    print({k: (round(r, 2), rep.summary()) for k, (r, rep) in results.items()})
    (r_plain, plain), (r_cal, cal) = results["plain"], results["calibrated"]
    assert r_cal > 0.9 * r_plain and cal.kl_mean < plain.kl_mean and cal.top1_agreement >= 0.9
