"""cachegen's ``rope_theta``: keys un-rotated before quantizing, rotated back after decoding.

Synthetic keys whose pre-rotation channels sit at steady offsets (what makes
un-rotating pay), the error bound per rotated pair, the container format
(version 2; version-1 containers still decode) and refusals.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kvstore.codecs  # noqa: F401  # registers the codecs
from kvstore.codecs.base import ChunkLayout, CodecParams
from kvstore.codecs.cachegen import CachegenCodec
from kvstore.codecs.cachegen_coder import available
from kvstore.codecs.cachegen_params import LEVEL_LAMBDA, CachegenParams
from kvstore.codecs.cachegen_profile import build_profile
from kvstore.codecs.cachegen_rope import rope_table
from kvstore.codecs.container import SectionData, pack, unpack
from kvstore.errors import CodecError, InvalidInput
from tests.codecs.test_cachegen import EPS, decode, kv, raw, spec, steps

pytestmark = pytest.mark.skipif(
    not available(), reason="kvstore._rangecoder is not built (needs a C compiler)"
)
THETA = 10000.0


def rotated_keys(layout: ChunkLayout, start: int, seed: int = 0) -> torch.Tensor:
    """KV whose keys are RoPE-rotated (positions ``start..``) steady offsets plus small noise."""
    layers, _, tokens, heads, dim = layout.shape
    g = torch.Generator().manual_seed(seed)
    x = kv(layout, seed=seed).float()
    pre = 3 * torch.randn(layers, 1, heads, dim, generator=g) + 0.2 * torch.randn(
        layers, tokens, heads, dim, generator=g
    )
    half = dim // 2
    inv = THETA ** (-torch.arange(half, dtype=torch.float64) * 2 / dim)
    angle = (torch.arange(start, start + tokens, dtype=torch.float64)[:, None] * inv).float()
    c, s = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    x1, x2 = pre[..., :half], pre[..., half:]
    x[:, 0] = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return x.to(torch.bfloat16)


def test_rope_round_trip_error_bound_per_pair() -> None:
    layout = ChunkLayout(spec(layers=3, heads=2, dim=16), 40)
    codec = CachegenCodec({"rope_theta": THETA, "exact_tokens": 2, "group": 5})
    x = rotated_keys(layout, start=700)
    blob = codec.encode(raw(x), layout)
    c = unpack(blob)
    assert c.params["rope_theta"] == THETA and c.params["format"] == 4
    y = decode(codec, blob, layout)
    assert torch.equal(y[:, :, :2], x[:, :, :2])  # exact tokens, bit for bit
    xf, yf, st = x.float()[:, :, 2:], y.float()[:, :, 2:], steps(c, layout)[:, :, 2:]
    tol = EPS["bfloat16"] * torch.maximum(xf.abs(), yf.abs())
    assert bool(((xf - yf).abs()[:, 1] <= 0.5 * st[:, 1] * (1 + 1e-5) + tol[:, 1]).all())  # values: per value
    err = (xf - yf)[:, 0]
    pair_err = (err[..., :8] ** 2 + err[..., 8:] ** 2).sqrt()
    pair_step = torch.maximum(st[:, 0, ..., :8], st[:, 0, ..., 8:])
    pair_tol = tol[:, 0, ..., :8] + tol[:, 0, ..., 8:]
    assert bool((pair_err <= math.sqrt(0.5) * pair_step * (1 + 1e-4) + pair_tol).all())


def calibrated(layout: ChunkLayout, theta: float, step: float) -> CachegenCodec:
    """A codec whose every channel has the same absolute step (a uniform sensitivity)."""
    sensitivity = np.full(
        layout.spec.num_layers * 2 * layout.spec.num_kv_heads * layout.spec.head_dim,
        (LEVEL_LAMBDA[2] / step) ** 2,
    )
    profile = build_profile(
        [(raw(kv(layout)), layout)], CachegenParams(level=2, rope_theta=theta), sensitivity=sensitivity
    )
    params: CodecParams = {
        "level": 2,
        "rope_theta": theta,
        "profile": profile.digest,
        "profile_tables": False,
    }
    return CachegenCodec(params, profiles=[profile])


def test_rope_makes_rotated_keys_smaller() -> None:
    """At equal steps (calibrated), un-rotating keys whose offsets RoPE turned saves bits."""
    layout = ChunkLayout(spec(layers=2, heads=2, dim=32), 256)
    x = rotated_keys(layout, start=5000, seed=1)
    plain, turned = calibrated(layout, 0.0, 0.5), calibrated(layout, THETA, 0.5)
    a, b = plain.encode(raw(x), layout), turned.encode(raw(x), layout)
    mse = [
        float((decode(k, blob, layout).float() - x.float()).pow(2).mean())
        for k, blob in ((plain, a), (turned, b))
    ]
    assert len(b) < 0.8 * len(a), (len(a), len(b))
    assert mse[1] < 1.5 * mse[0], mse


def test_rope_table_is_the_rope_angles() -> None:
    table = np.frombuffer(rope_table(5, 8, THETA), np.float32).reshape(5, 4, 2)
    assert table[0, :, 0].tolist() == [1.0] * 4 and table[0, :, 1].tolist() == [0.0] * 4
    assert table[3, 1, 0] == np.float32(math.cos(3 * THETA ** (-2 / 8)))
    assert table[4, 3, 1] == np.float32(math.sin(4 * THETA ** (-6 / 8)))


def test_rope_refusals_and_format_one() -> None:
    mla = ChunkLayout(spec("float32", "mla_latent", layers=2, dim=24), 8)
    with pytest.raises(InvalidInput, match="rope_theta"):
        CachegenCodec({"rope_theta": THETA}).encode(raw(kv(mla)), mla)
    layout = ChunkLayout(spec(layers=2, dim=16), 16)
    x = kv(layout, seed=2)
    codec = CachegenCodec({"token_scale": False})
    blob = codec.encode(raw(x), layout)
    c = unpack(blob)
    sections: list[tuple[str, SectionData]] = [(s.name, bytes(c.section(s.name))) for s in c.sections]
    old = {k: v for k, v in c.params.items() if k not in ("format", "rope_theta")}
    assert torch.equal(
        decode(codec, pack(c.codec, old, c.layout, sections), layout), decode(codec, blob, layout)
    )
    out = np.empty(layout.nbytes, np.uint8)
    for params in ({**old, "rope_theta": THETA}, {**c.params, "format": 4}, {**c.params, "format": 5}, {**c.params, "rope_theta": -1.0}):
        with pytest.raises(CodecError):
            codec.decode_into(pack(c.codec, params, c.layout, sections), out)
    m = unpack(CachegenCodec().encode(raw(kv(mla)), mla))
    mla_sections: list[tuple[str, SectionData]] = [(s.name, bytes(m.section(s.name))) for s in m.sections]
    with pytest.raises(CodecError, match="rope_theta"):
        codec.decode_into(pack(m.codec, {**m.params, "rope_theta": THETA}, m.layout, mla_sections), out)
