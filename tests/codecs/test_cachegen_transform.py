"""cachegen with a per-head transform (profile version 3, container format 3).

Synthetic KV and random (Fisher, covariance) statistics for the format, the
error bound and the refusals; the real SmolLM2 model for the head calibration
and the quality of transformed coding on a short context.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

import kvstore.codecs  # noqa: F401  # registers the codecs
from kvstore.codecs.base import ChunkLayout, CodecParams
from kvstore.codecs.cachegen import CachegenCodec
from kvstore.codecs.cachegen_bench import prefill_kv, to_chunks
from kvstore.codecs.cachegen_calibrate import calibrate_heads, rope_theta_of
from kvstore.codecs.cachegen_coder import available, rangecoder
from kvstore.codecs.cachegen_params import CachegenParams, token_multipliers
from kvstore.codecs.cachegen_profile import CachegenProfile, build_profile
from kvstore.codecs.cachegen_transform import HeadStatistics, HeadTransform, build_transform
from kvstore.codecs.container import SectionData, pack, unpack
from kvstore.errors import CodecError, InvalidInput
from kvstore.models.prompts import sample_passages
from kvstore.quality import QualityHarness
from tests.codecs.test_cachegen import EPS, decode, kv, raw, section, spec
from tests.models.real_model import model_threads, require_model  # noqa: F401  (autouse fixture)

pytestmark = pytest.mark.skipif(
    not available(), reason="kvstore._rangecoder is not built (needs a C compiler)"
)


def random_statistics(slabs: int, heads: int, dim: int, seed: int) -> HeadStatistics:
    """Random positive-definite (Fisher, covariance) per head, Fisher at a calibration's scale."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(2, slabs, heads, dim, dim))
    return HeadStatistics(a @ a.transpose(0, 1, 3, 2) * 1e-9, b @ b.transpose(0, 1, 3, 2))


def matrices(blob: bytes, t: HeadTransform) -> np.ndarray:
    return np.frombuffer(blob, "<f4").reshape(t.slabs, t.heads, t.head_dim, t.head_dim).astype(np.float64)


def setup(
    dtype: str = "bfloat16", theta: float = 0.0, tables: bool = True, seed: int = 0, tokens: int = 48
) -> tuple[CachegenCodec, CachegenProfile, ChunkLayout]:
    layout = ChunkLayout(spec(dtype, layers=2, heads=2, dim=16), tokens)
    t = build_transform(random_statistics(4, 2, 16, seed))
    samples = [(raw(kv(layout, seed=seed + i, channel_seed=seed)), layout) for i in range(2)]
    profile = build_profile(samples, CachegenParams(level=1, rope_theta=theta), transform=t)
    config: CodecParams = {"profile": profile.digest, "rope_theta": theta, "profile_tables": tables}
    return CachegenCodec(config, profiles=[profile]), profile, layout


def test_build_transform_inverts_and_decorrelates() -> None:
    stats = random_statistics(2, 3, 8, seed=1)
    t = build_transform(stats, ridge=0.05)
    fwd, inv = matrices(t.forward, t), matrices(t.inverse, t)
    assert np.allclose(inv @ fwd, np.eye(8), atol=1e-4)
    cov = fwd @ stats.covariance @ fwd.transpose(0, 1, 3, 2)  # of the components: diagonal, sorted
    var = np.einsum("shdd->shd", cov)
    off = cov - var[..., None] * np.eye(8)
    assert np.abs(off).max() < 1e-3 * var.max() and (np.diff(var, axis=-1) <= 1e-6 * var.max()).all()
    with pytest.raises(InvalidInput):
        build_transform(HeadStatistics(stats.fisher, stats.covariance[:1]))
    with pytest.raises(InvalidInput):
        build_transform(stats, ridge=0.0)
    with pytest.raises(InvalidInput):
        HeadTransform(2, 3, 8, t.forward[:-4], t.inverse)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("tables", [True, False])
def test_round_trip_error_bound_through_the_transform(dtype: str, tables: bool) -> None:
    """Each component is off by at most half its step: the values by sum_e |T^-1[d, e]| * step_e / 2."""
    codec, profile, layout = setup(dtype, tables=tables)
    assert profile.transform is not None
    x = kv(layout, seed=9, channel_seed=0)
    blob = codec.encode(raw(x), layout)
    c = unpack(blob)
    assert c.params["format"] == 4 and c.params["transform"] == profile.digest
    assert c.params["profile"] == (profile.digest if tables else "")
    y = decode(codec, blob, layout)
    assert torch.equal(y[:, :, :1], x[:, :, :1])  # the exact token, bit for bit
    qp = section(c, "qparams")
    n = len(qp) // 4
    step = (np.frombuffer(qp, "<u2")[n:].astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    mult = token_multipliers(section(c, "tscale")).astype(np.float64).reshape(4, -1)  # [slabs, tokens_q]
    steps = step.reshape(4, 1, 2, 16) * mult[:, :, None, None]  # [slabs, tokens_q, heads, D]
    inv = matrices(profile.transform.inverse, profile.transform)  # [slabs, heads, D, D]
    bound = np.einsum("shde,sthe->sthd", np.abs(inv), steps / 2)  # [slabs, tokens_q, heads, D]
    xs, ys = (v.float().numpy().reshape(2, 2, -1, 2, 16)[:, :, 1:].astype(np.float64) for v in (x, y))
    err = np.abs(xs - ys)
    full = bound.reshape(xs.shape) * (1 + 1e-3) + EPS[dtype] * np.maximum(np.abs(xs), np.abs(ys)) + 1e-4
    assert (err <= full).all(), float((err / full).max())
    assert err.max() > 0.01 * bound.max()  # it is lossy at all: the bound is not vacuous


def test_rotated_keys_error_bound() -> None:
    """With rope_theta the bound holds for un-rotated keys; a head's error norm survives the rotation."""
    codec, profile, layout = setup("float32", theta=1e4, seed=2)
    assert profile.transform is not None
    x = kv(layout, seed=3, channel_seed=2)
    c = unpack(blob := codec.encode(raw(x), layout))
    y = decode(codec, blob, layout)
    qp = section(c, "qparams")
    step = (np.frombuffer(qp, "<u2")[len(qp) // 4 :].astype(np.uint32) << 16).view(np.float32)
    inv = matrices(profile.transform.inverse, profile.transform)
    bound = np.einsum("shde,she->shd", np.abs(inv), step.astype(np.float64).reshape(4, 2, 16) / 2)
    err = (x.double() - y.double()).numpy().reshape(2, 2, -1, 2, 16)[:, :, 1:]
    norms = np.linalg.norm(err, axis=-1)  # [layers, kv, tokens, heads]
    limit = np.linalg.norm(bound.reshape(2, 2, 1, 2, 16), axis=-1) * (1 + 1e-3) + 1e-4
    assert (norms <= limit).all(), float((norms / limit).max())


def test_transform_profile_blob_and_refusals() -> None:
    _codec, profile, _layout = setup()
    blob = profile.to_bytes()
    d = msgpack.unpackb(blob, raw=False)
    assert d["version"] == 3 and (d["heads"], d["head_dim"]) == (2, 16)
    again = CachegenProfile.from_bytes(blob)
    assert again.digest == profile.digest and again.transform == profile.transform
    nan = bytearray(d["forward"])
    nan[0:4] = np.float32("nan").tobytes()
    for bad in ({**d, "forward": bytes(nan)}, {**d, "inverse": d["inverse"][:-4]}, {**d, "heads": 3}):
        with pytest.raises(CodecError):
            CachegenProfile.from_bytes(msgpack.packb(bad, use_bin_type=True))
    other = ChunkLayout(spec(layers=2, heads=1, dim=32), 8)  # same channels, other heads
    with pytest.raises(InvalidInput):
        CachegenCodec({"profile": profile.digest}, profiles=[profile]).encode(raw(kv(other)), other)


def test_decoding_needs_the_named_transform() -> None:
    codec, profile, layout = setup(tables=False)
    x = kv(layout, seed=4, channel_seed=0)
    blob = codec.encode(raw(x), layout)
    out = np.empty(layout.nbytes, np.uint8)
    with pytest.raises(CodecError, match="not available"):
        CachegenCodec().decode_into(blob, out)  # the profile that holds the transform is missing
    plain = build_profile([(raw(x), layout)], CachegenParams(level=1))
    c = unpack(blob)
    sections: list[tuple[str, SectionData]] = [(s.name, bytes(c.section(s.name))) for s in c.sections]
    reader = CachegenCodec({}, profiles=[profile, plain])
    assert torch.equal(decode(reader, blob, layout), decode(codec, blob, layout))
    for params in (
        {**c.params, "transform": plain.digest},  # a profile without a transform
        {**c.params, "format": 2},  # format 2 names no transform
        {**c.params, "transform": "xyz"},
    ):
        with pytest.raises(CodecError):
            reader.decode_into(pack(c.codec, params, c.layout, sections), out)
    no_transform = {k: v for k, v in c.params.items() if k != "transform"}  # decodes, to other values
    reader.decode_into(pack(c.codec, no_transform, c.layout, sections), out)


def test_constant_components_are_summed_once() -> None:
    """The decoder's shortcut for one-symbol components gives the values of the full product."""
    rng = np.random.default_rng(5)
    slabs, tokens, exact, heads, dim = 2, 9, 1, 2, 16
    x = rng.normal(size=(slabs, tokens, heads, dim)).astype(np.float32)
    live = (rng.random(slabs * heads * dim) < 0.5).astype(np.uint8)
    x = np.where(live.reshape(slabs, 1, heads, dim) == 0, x[:, exact : exact + 1], x)
    m = rng.normal(size=(slabs, heads, dim, dim)).astype(np.float32)
    full, short = np.zeros_like(x), np.zeros_like(x)
    rangecoder().transform(x, full, slabs, tokens, exact, heads, dim, m.tobytes(), None)
    rangecoder().transform(x, short, slabs, tokens, exact, heads, dim, m.tobytes(), live.tobytes())
    assert np.allclose(full[:, exact:], short[:, exact:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        rangecoder().transform(x, short, slabs, tokens, exact, heads, dim, m.tobytes()[:-4], None)
    with pytest.raises(ValueError):
        rangecoder().transform(x, x, slabs, tokens, exact, heads, dim, m.tobytes(), None)


@pytest.mark.slow  # about 100 s on a loaded 2-core machine; the synthetic tests above run by default
def test_real_model_transform_quality() -> None:
    """Head calibration on SmolLM2, then a transformed level: smaller than the diagonal one, as good."""
    loaded = require_model()
    calib_ids, ids = (
        list(p.token_ids) for p in sample_passages(loaded.tokenizer, tokens=288, count=2, seed=11)
    )
    theta = rope_theta_of(loaded)
    stats = calibrate_heads(loaded, [(calib_ids[:256], calib_ids[256:])], draws=1, rope_theta=theta)
    assert stats.fisher.shape == (60, 3, 64, 64) and np.isfinite(stats.fisher).all()
    diag = np.einsum("shdd->shd", stats.fisher)
    assert (diag >= 0).all() and diag.max() > 0
    spec_bf16 = loaded.spec_for("bfloat16")
    calib_kv = prefill_kv(loaded, calib_ids[:256])
    samples = [(r, ChunkLayout(spec_bf16, 256)) for r in to_chunks(calib_kv, 256)]
    profile = build_profile(
        samples, CachegenParams(level=1, rope_theta=theta), transform=build_transform(stats)
    )
    codec = CachegenCodec(
        {"profile": profile.digest, "rope_theta": theta, "profile_tables": False}, [profile]
    )
    harness = QualityHarness(loaded, ids[:256], ids[256:], greedy_tokens=0)
    chunk = to_chunks(harness.reference_kv, 256)[0]
    layout = ChunkLayout(spec_bf16, 256)
    blob = codec.encode(chunk, layout)
    out = np.empty(layout.nbytes, np.uint8)
    codec.decode_into(blob, out)
    test_kv = torch.from_numpy(out).view(torch.bfloat16).reshape(layout.shape).float()
    report = harness.evaluate(lambda _: test_kv)
    assert chunk.size / len(blob) > 4.0, chunk.size / len(blob)  # ratio against bfloat16
    assert report.kl_mean < 0.05 and report.top1_agreement >= 0.8, report.summary()
