"""cachegen container format 4: a step code per (slab, token) from the token's own norms.

The codes against a float64 reference, what they do to the steps and the
errors, old formats beside the new one, and forged ``tscale`` sections and
steps, refused with CodecError.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kvstore.codecs  # noqa: F401  # registers the codecs
from kvstore.codecs.base import ChunkLayout
from kvstore.codecs.cachegen import CachegenCodec
from kvstore.codecs.cachegen_coder import SCALED_SECTION_NAMES, SECTION_NAMES, available, rangecoder, token_codes
from kvstore.codecs.cachegen_params import TOKEN_SCALE_STEP, Geometry, token_multipliers
from kvstore.codecs.container import unpack
from kvstore.errors import CodecError, InvalidInput
from tests.codecs.test_cachegen import decode, forged, kv, raw, section, spec, steps

pytestmark = pytest.mark.skipif(not available(), reason="kvstore._rangecoder is not built")


def reference_codes(x: np.ndarray, exact: int) -> np.ndarray:
    """Step codes from ``x`` ``[slabs, tokens, heads, dim]`` in float64 with logs: the definition."""
    norms = np.sqrt((x[:, exact:].astype(np.float64) ** 2).sum(-1)).sum(-1)  # [slabs, tokens_q]
    out = np.zeros(norms.shape, np.int64)
    for s, row in enumerate(norms):
        live = row > 0
        c = np.round(4 * np.log2(np.where(live, row, 1.0))).astype(np.int64)
        centre = math.floor(c[live].mean() + 0.5) if live.any() else 0
        out[s] = np.where(live, np.clip(c - centre, -8, 8), 0)
    return out


def test_codes_match_the_float64_definition() -> None:
    rng = np.random.default_rng(3)
    for trial in range(20):
        slabs, tokens, heads, dim = 4, int(rng.integers(1, 70)), int(rng.integers(1, 4)), 8
        exact = min(int(rng.integers(0, 3)), tokens)
        scale = np.exp(rng.uniform(-6, 6, (slabs, tokens, 1, 1)))  # norms over +-8 octaves: clamps too
        x = (rng.standard_normal((slabs, tokens, heads, dim)) * scale).astype(np.float32)
        x[:, rng.random(tokens) < 0.1] = 0.0  # all-zero tokens: code 0, left out of the centre
        layout = ChunkLayout(spec("float32", "mla_latent", layers=slabs, dim=heads * dim), tokens)
        g = Geometry.of(layout, exact)
        g = Geometry(g.slabs, g.tokens, g.channels, g.exact, 1, 2, 4, heads, dim)
        got = np.frombuffer(token_codes(x.tobytes(), g), np.int8).reshape(slabs, tokens - exact)
        assert np.array_equal(got, reference_codes(x, exact)), trial


def test_small_norm_tokens_get_finer_steps_and_smaller_errors() -> None:
    layout = ChunkLayout(spec("float32", layers=2, heads=2, dim=16), 64)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(layout.shape, generator=gen) * torch.exp(torch.randn(16, generator=gen))  # centred
    x[:, :, 1::2] *= 1 / 16  # every other token four octaves smaller
    codec = CachegenCodec({"exact_tokens": 1})
    blob = codec.encode(raw(x), layout)
    c = unpack(blob)
    assert c.params["format"] == 4 and tuple(s.name for s in c.sections) == SCALED_SECTION_NAMES
    codes = np.frombuffer(section(c, "tscale"), np.int8).reshape(4, 63)  # token 0 is exact
    small, large = codes[:, 0::2], codes[:, 1::2]  # tokens 1, 3, ... are the small ones
    assert small.max() < large.min() and small.mean() < -5 and large.mean() > 5
    y = decode(codec, blob, layout).float()
    err_small = (y - x)[:, :, 1::2].abs().amax()
    err_large = (y - x)[:, :, 2::2].abs().amax()
    assert err_small < err_large / 4
    plain = CachegenCodec({"exact_tokens": 1, "token_scale": False})
    y0 = decode(plain, plain.encode(raw(x), layout), layout).float()
    mean_small, mean_small0 = ((v - x)[:, :, 1::2].abs().mean() for v in (y, y0))
    assert mean_small < mean_small0 / 1.5  # uniform steps round most of them to the channel's mean


def test_global_step_is_raised_with_codes() -> None:
    """Format 4's step targets are TOKEN_SCALE_STEP times format 2's (the codes then centre on them)."""
    layout = ChunkLayout(spec("float32", layers=2, heads=2, dim=16), 256)
    x = kv(layout, seed=6).float() * 0.01  # no channel needs its step raised for its range
    c4 = unpack(CachegenCodec().encode(raw(x), layout))
    c2 = unpack(CachegenCodec({"token_scale": False}).encode(raw(x), layout))
    base = [np.frombuffer(section(c, "qparams"), "<u2")[128:].astype(np.uint32) << 16 for c in (c4, c2)]
    ratio = base[0].view(np.float32) / base[1].view(np.float32)
    assert abs(float(np.median(ratio)) / TOKEN_SCALE_STEP - 1) < 0.01, ratio  # bfloat16 rounding of both


def test_formats_two_and_four_side_by_side() -> None:
    layout = ChunkLayout(spec(layers=2, dim=16), 40)
    x = kv(layout, seed=7)
    old, new = CachegenCodec({"token_scale": False}), CachegenCodec()
    b2, b4 = old.encode(raw(x), layout), new.encode(raw(x), layout)
    c2, c4 = unpack(b2), unpack(b4)
    assert c2.params["format"] == 2 and tuple(s.name for s in c2.sections) == SECTION_NAMES
    assert c4.params["format"] == 4 and tuple(s.name for s in c4.sections) == SCALED_SECTION_NAMES
    # either codec decodes either container: the format, not the config, says how
    assert torch.equal(decode(new, b2, layout), decode(old, b2, layout))
    assert torch.equal(decode(old, b4, layout), decode(new, b4, layout))


def test_forged_tscale_and_steps_are_refused() -> None:
    layout = ChunkLayout(spec("float32", layers=2, dim=16), 32)
    codec = CachegenCodec({"group": 8})
    blob = codec.encode(raw(kv(layout, seed=9)), layout)
    c = unpack(blob)
    codes = section(c, "tscale")
    out = np.empty(layout.nbytes, np.uint8)
    words = np.frombuffer(section(c, "qparams"), "<u2").copy()
    words[len(words) // 2] = 0x7F00  # a step of 2^127: finite, but 4 times it is not
    bad_cases = [
        ("tscale", bytes([9]) + codes[1:]),  # a code outside [-8, 8]
        ("tscale", bytes([0xF7]) + codes[1:]),  # -9
        ("tscale", codes[:-1]),  # one code short
        ("tscale", codes + b"\x00"),
        ("qparams", words.tobytes()),
    ]
    for name, data in bad_cases:
        with pytest.raises(CodecError):
            codec.decode_into(forged(blob, name, data), out)
    from kvstore.codecs.container import pack

    kept = [(s.name, bytes(s_data)) for s, s_data in ((s, c.section(s.name)) for s in c.sections)]
    without = [(n, d) for n, d in kept if n != "tscale"]
    with pytest.raises(CodecError, match="sections"):
        codec.decode_into(pack(c.codec, dict(c.params), c.layout, without), out)  # format 4, no codes
    with pytest.raises(CodecError, match="sections"):
        codec.decode_into(pack(c.codec, {**c.params, "format": 2}, c.layout, kept), out)  # codes, format 2
    with pytest.raises(ValueError, match=r"\[-8, 8\]"):  # the C coder checks too
        rangecoder().quantize(
            raw(kv(layout)), 2, 4, 32, 32, 1, section(c, "qparams"), 128, None, None, b"\x09" * (4 * 31)
        )


def test_non_finite_values_are_refused_before_codes() -> None:
    layout = ChunkLayout(spec(layers=2, dim=16), 8)
    x = kv(layout)
    x[0, 1, 3, 0, 2] = float("inf")
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        CachegenCodec().encode(raw(x), layout)
