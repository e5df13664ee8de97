"""raw, lossless and quant codecs: round trips, bit-exactness, error bounds, grouping, ratios, errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch

import kvstore.codecs  # noqa: F401  # registers the codecs
from kvstore.codecs.base import ChunkLayout, Codec, codec_names, make_codec
from kvstore.codecs.container import SectionData, pack, unpack
from kvstore.codecs.lossless import shuffle, unshuffle_into
from kvstore.errors import CodecError, InvalidInput, UnknownName
from kvstore.spec import KVSpec, ModelFingerprint

TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPES = list(TORCH)
M = ModelFingerprint("test/model")


def layout(dtype: str = "bfloat16", mla: bool = False, tokens: int = 32, heads: int = 2, dim: int = 64,
           layers: int = 2) -> ChunkLayout:
    if mla:
        return ChunkLayout(KVSpec(M, layers, 1, dim, dtype, "mla_latent"), tokens)  # type: ignore[arg-type]
    return ChunkLayout(KVSpec(M, layers, heads, dim, dtype), tokens)  # type: ignore[arg-type]


def chunk(lay: ChunkLayout, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(lay.shape, generator=g) * scale).to(TORCH[lay.spec.dtype])


def raw_of(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().view(-1).view(torch.uint8).numpy()


def round_trip(codec: Codec, x: torch.Tensor, lay: ChunkLayout) -> tuple[torch.Tensor, bytes]:
    buf = codec.encode(raw_of(x), lay)
    out = np.full(lay.nbytes, 0xAB, dtype=np.uint8)
    assert codec.decode_into(buf, out) == lay
    return torch.from_numpy(out).view(x.dtype).view(x.shape), buf


def test_registry_names() -> None:
    assert {"raw", "lossless", "quant"} <= set(codec_names())
    with pytest.raises(UnknownName):
        make_codec("nope")


# -- raw and lossless -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["raw", "lossless"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mla", [False, True])
def test_lossless_codecs_are_bit_exact(name: str, dtype: str, mla: bool) -> None:
    lay = layout(dtype, mla)
    x = chunk(lay)
    y, _ = round_trip(make_codec(name), x, lay)
    assert torch.equal(y.view(torch.uint8), x.view(torch.uint8))


def _special_values(dtype: str, n: int) -> torch.Tensor:
    """Every bit pattern class that must survive: NaN payloads, +-inf, -0.0, subnormals, extremes."""
    bits = {"float32": (np.uint32, 4), "float16": (np.uint16, 2), "bfloat16": (np.uint16, 2)}[dtype]
    rng = np.random.default_rng(7)
    words = rng.integers(0, np.iinfo(bits[0]).max, n, dtype=bits[0], endpoint=True)  # includes NaNs
    specials = {
        "float32": [0x7FC00001, 0xFFC12345, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001, 0x7F7FFFFF, 0x7FBFFFFF],
        "float16": [0x7E01, 0xFE55, 0x7C00, 0xFC00, 0x8000, 0x0001, 0x7BFF, 0x7D00],
        "bfloat16": [0x7FC1, 0xFF81, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x7F7F, 0x7FA0],
    }[dtype]
    words[: len(specials)] = specials
    return torch.from_numpy(words.view(np.uint8).copy()).view(TORCH[dtype])


@pytest.mark.parametrize("name", ["raw", "lossless"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lossless_keeps_nan_payloads_inf_and_negative_zero(name: str, dtype: str) -> None:
    lay = layout(dtype)
    x = _special_values(dtype, lay.nbytes // lay.spec.itemsize).view(lay.shape)
    y, _ = round_trip(make_codec(name, {"level": 19} if name == "lossless" else None), x, lay)
    assert np.array_equal(raw_of(y), raw_of(x))
    assert torch.isnan(x).any() and torch.isinf(x).any() and (torch.signbit(x) & (x == 0)).any()


def test_shuffle_separates_bf16_high_and_low_bytes() -> None:
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    raw = raw_of(x)
    planes = shuffle(raw, 2)
    assert list(planes[:3]) == list(raw[0::2]) and list(planes[3:]) == list(raw[1::2])
    assert list(planes[3:]) == [0x3F, 0xC0, 0x3F]  # the high bytes: sign + exponent
    for itemsize in (1, 2, 4):
        data = np.random.default_rng(itemsize).integers(0, 256, 64, dtype=np.uint8)
        out = np.empty_like(data)
        unshuffle_into(shuffle(data, itemsize), itemsize, out)
        assert np.array_equal(out, data)


def test_lossless_compresses_random_normal_bf16() -> None:
    lay = layout("bfloat16", tokens=256)
    _, buf = round_trip(make_codec("lossless"), chunk(lay), lay)
    assert lay.nbytes / len(buf) > 1.3  # the exponent bytes compress; measured ~1.46x (docs/codecs.md)


def test_lossless_params() -> None:
    assert make_codec("lossless").params == {"level": 1}
    assert make_codec("lossless", {"level": 5}).params == {"level": 5}
    for bad in [{"level": 23}, {"level": "3"}, {"level": True}, {"lvl": 3}]:
        with pytest.raises(InvalidInput):
            make_codec("lossless", bad)
    with pytest.raises(InvalidInput):
        make_codec("raw", {"level": 1})


# -- quant ------------------------------------------------------------------------------------------


def _ranges(x: torch.Tensor, axis: str, g: int) -> torch.Tensor:
    """Per-element (max - min) of its group, computed independently of kvstore: x is [L, 2, T, H, D]."""
    L, _, T, H, D = x.shape
    f = x.float().reshape(L, 2, T, H * D)
    if axis == "token":
        grouped = f.reshape(L, 2, T, H * D // g, g)
        r = grouped.amax(-1, keepdim=True) - grouped.amin(-1, keepdim=True)
    else:
        grouped = f.reshape(L, 2, T // g, g, H * D)
        r = grouped.amax(3, keepdim=True) - grouped.amin(3, keepdim=True)
    return r.expand_as(grouped).reshape(x.shape)


def _stored_scales(buf: bytes, x: torch.Tensor, axis: str, g: int) -> torch.Tensor:
    """Per-element scale as stored in the container, read in the documented order."""
    L, _, T, H, D = x.shape
    c = unpack(buf)
    s = torch.from_numpy(np.frombuffer(c.section("scale"), dtype="<f2").astype(np.float32))
    if axis == "token":
        return s.view(L, 2, T, H * D // g, 1).expand(L, 2, T, H * D // g, g).reshape(x.shape)
    return s.view(L, 2, T // g, 1, H * D).expand(L, 2, T // g, g, H * D).reshape(x.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_int_error_is_at_most_half_a_stored_scale(dtype: str, bits: int, axis: str) -> None:
    lay = layout(dtype, tokens=64, heads=2, dim=32)
    x = chunk(lay, seed=bits, scale=3.0)
    params = {"bits": bits, "group": axis, "group_size": 32, "exact_tokens": 0}  # every token quantized
    y, buf = round_trip(make_codec("quant", params), x, lay)
    err = (y.float() - x.float()).abs()
    scale = _stored_scales(buf, x, axis, 32)
    true_scale = _ranges(x, axis, 32) / (2**bits - 1)
    assert (scale >= true_scale).all() and (scale <= true_scale * 1.01 + 1e-3).all()
    out_rounding = 0.0 if dtype == "float32" else y.float().abs() * 2.0**-8  # rounding the result to 16 bits
    assert (err <= scale / 2 * (1 + 1e-5) + out_rounding + 1e-6).all()


def test_kivi_quantizes_keys_per_channel_and_values_per_token() -> None:
    lay = layout("float32", tokens=64, heads=2, dim=32)
    _, _, T, H, D = lay.shape
    g = torch.Generator().manual_seed(3)
    x = torch.randn(lay.shape, generator=g) * 0.01
    x[:, 0] += torch.linspace(-50, 50, H * D).view(1, 1, H, D)  # K: outlier channels, flat over tokens
    x[:, 1] *= torch.logspace(0, 4, T).view(1, T, 1, 1)  # V: token magnitudes spanning 1e4
    outs = {}
    for group in ["kivi", "token", "channel"]:
        outs[group], _ = round_trip(make_codec("quant", {"bits": 4, "group": group, "group_size": 32}), x, lay)
    assert torch.equal(outs["kivi"][:, 0], outs["channel"][:, 0])  # K exactly as per-channel groups
    assert torch.equal(outs["kivi"][:, 1], outs["token"][:, 1])  # V exactly as per-token groups

    def err(y: torch.Tensor, kv: int) -> float:  # worst error relative to its token's magnitude
        return float(((y[:, kv] - x[:, kv]).abs() / x[:, kv].abs().amax((-2, -1), keepdim=True)).max())

    assert err(outs["channel"], 0) * 100 < err(outs["token"], 0)  # and those are the right choices here
    assert err(outs["token"], 1) * 10 < err(outs["channel"], 1)


@pytest.mark.parametrize("mla", [False, True])
@pytest.mark.parametrize("group", ["token", "channel", "kivi", "tensor"])
def test_quant_round_trips_both_layouts_with_ragged_groups(mla: bool, group: str) -> None:
    lay = layout("bfloat16", mla=mla, tokens=37, heads=3, dim=24)  # 37 tokens, 72 channels: tails everywhere
    x = chunk(lay, seed=5)
    for params in [{"bits": 8, "group_size": 16}, {"bits": 4, "group_size": 32}, {"bits": 2},
                   {"bits": 8, "format": "e4m3"}]:
        y, buf = round_trip(make_codec("quant", {**params, "group": group}), x, lay)
        err = float((y.float() - x.float()).abs().max())
        assert err < {8: 0.35, 4: 1.0, 2: 4.0}[int(params["bits"])], (params, err)
        c = unpack(buf)
        assert c.params["group"] == group and c.layout == lay


def test_mla_kivi_is_per_channel() -> None:
    lay = layout("float32", mla=True, tokens=64, dim=64)
    x = chunk(lay, seed=9)
    a, _ = round_trip(make_codec("quant", {"bits": 4, "group": "kivi"}), x, lay)
    b, _ = round_trip(make_codec("quant", {"bits": 4, "group": "channel"}), x, lay)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", ["tensor", "channel"])
def test_fp8_e4m3_error_bound(dtype: str, group: str) -> None:
    lay = layout(dtype, tokens=64)
    x = chunk(lay, seed=11, scale=20.0)
    y, buf = round_trip(make_codec("quant", {"bits": 8, "format": "e4m3", "group": group}), x, lay)
    c = unpack(buf)
    assert [s.name for s in c.sections] == ["codes", "scale"]
    scales = np.frombuffer(c.section("scale"), dtype="<f2").astype(np.float32)
    assert len(scales) == (lay.spec.num_layers * 2 if group == "tensor" else lay.spec.num_layers * 2 * 128)
    smax = float(scales.max())
    # 3 mantissa bits: half an ulp is 2^-4 relative; subnormals are 2^-9 * scale apart
    bound = x.float().abs() * (2.0**-4 + 2.0**-8) + smax * 2.0**-10 + 1e-6
    assert ((y.float() - x.float()).abs() <= bound).all()


def test_ratios_meet_the_issue_targets_on_llama_geometry() -> None:
    lay = ChunkLayout(KVSpec(M, 2, 8, 128, "bfloat16"), 256)  # Llama-3-8B per-layer geometry, 2 layers
    raw = raw_of(chunk(lay))
    ratio = {}
    for key, params in {"int8": {"bits": 8}, "int4-kivi": {"bits": 4, "group": "kivi"},
                        "int2-kivi": {"bits": 2, "group": "kivi"}, "fp8": {"format": "e4m3"}}.items():
        ratio[key] = lay.nbytes / len(make_codec("quant", params).encode(raw, lay))
    assert ratio["int8"] >= 1.9 and ratio["int4-kivi"] >= 3.5 and ratio["int2-kivi"] >= 6.5
    assert ratio["fp8"] >= 1.95


def test_large_values_switch_to_float32_scales() -> None:
    lay = layout("float32")
    x = chunk(lay, seed=2) * 1e6
    y, buf = round_trip(make_codec("quant", {"bits": 8}), x, lay)
    assert unpack(buf).params["scale_dtype"] == "float32"
    assert float(((y - x).abs() / x.abs().amax()).max()) < 0.01


def test_constant_and_zero_groups() -> None:
    lay = layout("float16")
    for value in [0.0, 3.25, -1e-3]:
        x = torch.full(lay.shape, value, dtype=torch.float16)
        for params in [{"bits": 4}, {"bits": 2, "group": "kivi"}, {"format": "e4m3"}]:
            y, _ = round_trip(make_codec("quant", params), x, lay)
            assert float((y.float() - value).abs().max()) <= abs(value) * 2.0**-4 + 1e-7


def test_decoding_uses_the_container_params_not_the_instance() -> None:
    lay = layout()
    x = chunk(lay)
    buf = make_codec("quant", {"bits": 2, "group": "kivi"}).encode(raw_of(x), lay)
    a = np.empty(lay.nbytes, np.uint8)
    b = np.empty(lay.nbytes, np.uint8)
    make_codec("quant", {"bits": 2, "group": "kivi"}).decode_into(buf, a)
    make_codec("quant").decode_into(buf, b)
    assert np.array_equal(a, b)


def test_quant_refuses_bad_params_dtypes_and_values() -> None:
    for bad in [{"bits": 3}, {"bits": 4, "format": "e4m3"}, {"group": "head"}, {"group_size": 0},
                {"group_size": True}, {"format": "e5m2"}, {"scale_dtype": "bfloat16"}, {"zero": 1}]:
        with pytest.raises(InvalidInput):
            make_codec("quant", bad)
    assert make_codec("quant", {"format": "e4m3"}).params["group"] == "tensor"
    int_lay = ChunkLayout(KVSpec(M, 1, 1, 8, "int8"), 4)
    with pytest.raises(InvalidInput, match="float"):
        make_codec("quant").encode(np.zeros(int_lay.nbytes, np.uint8), int_lay)
    lay = layout("float32")
    x = chunk(lay)
    x[1, 1, 3, 0, 5] = float("nan")
    with pytest.raises(InvalidInput, match="finite"):
        make_codec("quant").encode(raw_of(x), lay)


OLD_KEYS = {"bits", "format", "group", "group_size", "scale_dtype"}  # a quant header before exact_tokens


def _repack(buf: bytes, params: Mapping[str, Any] | None = None, **sections: bytes) -> bytes:
    """``buf`` re-written with other params or section bytes (fresh checksums: only the schema can object)."""
    c = unpack(buf)
    data: list[tuple[str, SectionData]] = [(s.name, bytes(sections.get(s.name, c.section(s.name))))
                                           for s in c.sections]
    return pack("quant", dict(params if params is not None else c.params), c.layout, data)


def test_int8_defaults_are_kivi_with_the_first_token_exact() -> None:
    assert make_codec("quant").params == {"bits": 8, "format": "int", "group": "kivi", "group_size": 128,
                                          "scale_dtype": "float16", "exact_tokens": 1}
    assert make_codec("quant", {"bits": 8}).params == make_codec("quant").params
    cases: list[tuple[dict[str, Any], str]] = [({"bits": 4}, "token"), ({"bits": 2}, "token"),
                                                ({"format": "e4m3"}, "tensor")]
    for params, group in cases:
        p = make_codec("quant", params).params
        assert p["group"] == group and "exact_tokens" not in p  # as before the key existed
    assert make_codec("quant", {"exact_tokens": 0}).params["group"] == "kivi"
    assert make_codec("quant", {"bits": 4, "exact_tokens": 2}).params["exact_tokens"] == 2


@pytest.mark.parametrize("mla", [False, True])
@pytest.mark.parametrize("params", [{}, {"bits": 4, "group": "token", "exact_tokens": 3},
                                    {"format": "e4m3", "group": "channel", "exact_tokens": 1}])
def test_exact_tokens_are_verbatim_and_the_rest_a_chunk_of_its_own(mla: bool, params: dict[str, Any]) -> None:
    lay = layout("bfloat16", mla=mla, tokens=37, heads=3, dim=24)
    x = chunk(lay, seed=11)
    tok = 1 if mla else 2  # the token axis of [L, T, D] / [L, 2, T, H, D]
    x.narrow(tok, 0, 1).mul_(300)  # an attention-sink-like outlier token
    codec = make_codec("quant", params)
    e = int(codec.params.get("exact_tokens", 0))
    y, buf = round_trip(codec, x, lay)
    assert [s.name for s in unpack(buf).sections][-1] == "exact"
    assert torch.equal(y.narrow(tok, 0, e), x.narrow(tok, 0, e))
    # the other tokens are exactly what the same groups give for them alone
    rest = ChunkLayout(lay.spec, 37 - e)
    x_rest = x.narrow(tok, e, 37 - e).contiguous()
    alone, _ = round_trip(make_codec("quant", {**codec.params, "exact_tokens": 0}), x_rest, rest)
    assert torch.equal(y.narrow(tok, e, 37 - e), alone)
    if codec.params["group"] == "token" or codec.params["format"] != "int":
        return  # per-token groups never mix tokens; e4m3's error is relative to each value
    # integer groups along tokens: far better than with the outlier inside them
    with_outlier, _ = round_trip(make_codec("quant", {**codec.params, "exact_tokens": 0}), x, lay)
    err = (y.float() - x.float()).abs().narrow(tok, e, 37 - e).max()
    err_outlier = (with_outlier.float() - x.float()).abs().narrow(tok, e, 37 - e).max()
    assert err * 4 < err_outlier


def test_exact_tokens_beyond_the_chunk_store_it_all() -> None:
    lay = layout("float16", tokens=5)
    x = chunk(lay, seed=4)
    y, buf = round_trip(make_codec("quant", {"bits": 2, "exact_tokens": 8}), x, lay)
    assert torch.equal(y, x)
    c = unpack(buf)
    assert [len(c.section(n)) for n in ("codes", "scale", "zero")] == [0, 0, 0]
    assert c.params["exact_tokens"] == 8


def test_containers_without_exact_tokens_decode_as_before() -> None:
    lay = layout("bfloat16", tokens=64)
    x = chunk(lay, seed=6)
    old_style = make_codec("quant", {"bits": 8, "group": "token", "exact_tokens": 0})
    buf = old_style.encode(raw_of(x), lay)
    assert set(unpack(buf).params) == OLD_KEYS  # the header an older version wrote, byte for byte
    a = np.empty(lay.nbytes, np.uint8)
    b = np.empty(lay.nbytes, np.uint8)
    old_style.decode_into(buf, a)
    make_codec("quant").decode_into(buf, b)  # today's default int8 reads it with the container's params
    assert np.array_equal(a, b)
    y = torch.from_numpy(b).view(torch.bfloat16).view(x.shape)
    assert not torch.equal(y[:, :, 0], x[:, :, 0])  # token 0 was quantized, not exact
    assert float((y.float() - x.float()).abs().max()) < 0.05
    # a default container stripped of its key is refused, not misread
    new = make_codec("quant").encode(raw_of(x), lay)
    params = {k: v for k, v in unpack(new).params.items() if k != "exact_tokens"}
    with pytest.raises(CodecError, match="sections"):
        make_codec("quant").decode_into(_repack(new, params), a)


def test_exact_tokens_refuse_bad_values_and_hostile_sections() -> None:
    bad_values: list[Any] = [-1, True, 1.0, "1", 2**16 + 1, None]
    for bad in bad_values:
        with pytest.raises(InvalidInput, match="exact_tokens"):
            make_codec("quant", {"exact_tokens": bad})
    lay = layout("bfloat16", tokens=16)
    x = chunk(lay, seed=8)
    buf = make_codec("quant").encode(raw_of(x), lay)
    out = np.empty(lay.nbytes, np.uint8)
    for value in [-1, 2**16 + 1, True, "1"]:
        with pytest.raises(CodecError, match="exact_tokens"):
            make_codec("quant").decode_into(_repack(buf, {**unpack(buf).params, "exact_tokens": value}), out)
    exact = bytes(unpack(buf).section("exact"))
    with pytest.raises(CodecError, match="'exact'"):
        make_codec("quant").decode_into(_repack(buf, exact=exact[:-2]), out)
    nan = np.frombuffer(exact, np.uint16).copy()
    nan[3] = 0x7FC0  # a bfloat16 NaN
    with pytest.raises(CodecError, match="finite"):
        make_codec("quant").decode_into(_repack(buf, exact=nan.tobytes()), out)
    x[0, 1, 0, 1, 2] = float("inf")  # in the exact token
    with pytest.raises(InvalidInput, match="finite"):
        make_codec("quant").encode(raw_of(x), lay)


# -- errors common to every codec -------------------------------------------------------------------

CODECS = [("raw", None), ("lossless", None), ("quant", {"bits": 4, "group": "kivi"}), ("quant", {"format": "e4m3"})]


@pytest.mark.parametrize("name, params", CODECS)
def test_wrong_input_size_and_small_output_raise_invalid_input(name: str, params: dict[str, int] | None) -> None:
    codec = make_codec(name, params)
    lay = layout()
    raw = raw_of(chunk(lay))
    for bad in [raw[:-2], np.concatenate([raw, raw[:2]]), raw[:0]]:
        with pytest.raises(InvalidInput):
            codec.encode(bad, lay)
    buf = codec.encode(raw, lay)
    with pytest.raises(InvalidInput, match="too small"):
        codec.decode_into(buf, np.empty(lay.nbytes - 1, np.uint8))
    with pytest.raises(InvalidInput):
        codec.decode_into(buf, np.frombuffer(bytes(lay.nbytes), np.uint8))  # read-only
    big = np.full(lay.nbytes + 10, 7, np.uint8)  # a larger output is fine; the tail is left alone
    codec.decode_into(buf, big)
    assert (big[lay.nbytes :] == 7).all()


def test_decoding_another_codecs_container_raises_codec_error() -> None:
    lay = layout()
    raw = raw_of(chunk(lay))
    out = np.empty(lay.nbytes, np.uint8)
    for writer, wparams in CODECS:
        buf = make_codec(writer, wparams).encode(raw, lay)
        for reader, rparams in CODECS:
            if reader != writer:
                with pytest.raises(CodecError, match="written by codec"):
                    make_codec(reader, rparams).decode_into(buf, out)
    for reader, rparams in CODECS:
        with pytest.raises(CodecError):
            make_codec(reader, rparams).decode_into(b"KVC1" + bytes(100), out)


# -- the numpy float conversions agree with torch's ------------------------------------------------


def _all_f32_probes() -> np.ndarray:
    """Every bf16 / e4m3 tie and neighbour region: random bits, exact ties, subnormals, extremes."""
    rng = np.random.default_rng(42)
    words = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 2**16, 20_000, dtype=np.uint64).astype(np.uint32) << 16) | np.uint32(0x8000)
    values = np.concatenate([words.view(np.float32), ties.view(np.float32),
                             np.float32([0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45, 2.0**-6, 2.0**-10])])
    return values


def test_numpy_bf16_conversions_match_torch() -> None:
    from kvstore.codecs.quant_floats import bf16_to_f32, f32_to_bf16

    x = _all_f32_probes()
    x = x[~np.isnan(x)]
    ours = f32_to_bf16(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(bf16_to_f32(ours), torch.from_numpy(ours.view(np.int16)).view(torch.bfloat16).float().numpy())


def test_numpy_e4m3_conversion_matches_torch() -> None:
    from kvstore.codecs.quant_floats import E4M3_VALUES, f32_to_e4m3

    x = _all_f32_probes()
    x = np.clip(x[np.isfinite(x)], -448, 448).astype(np.float32)
    exact = E4M3_VALUES[np.isfinite(E4M3_VALUES)]
    mids = (exact[:-1] + exact[1:]) / 2  # ties between neighbouring e4m3 values (for the sorted positives)
    x = np.concatenate([x, exact, np.sort(exact), mids, np.float32(2.0**-9) * np.arange(-20, 20, 0.5, dtype=np.float32)])
    ours = f32_to_e4m3(x.astype(np.float32))
    theirs = torch.from_numpy(x.astype(np.float32)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(ours, theirs)
