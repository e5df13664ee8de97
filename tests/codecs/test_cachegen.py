"""The cachegen codec: round trips, error bounds, determinism, levels, profiles, corruption.

Synthetic KV here (per-channel offsets and scales, heavy-tailed tokens);
the real-model checks are at the end (the short one runs by default, the
2048-token one is marked slow).
"""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zstandard

import kvstore.codecs  # noqa: F401  # registers the codecs
from kvstore.codecs import cachegen_ref as ref
from kvstore.codecs.base import ChunkLayout, CodecParams, codec_names, make_codec
from kvstore.codecs.cachegen import CachegenCodec
from kvstore.codecs.cachegen_coder import META_SECTIONS, SCALED_SECTION_NAMES, SECTION_NAMES, available, rangecoder
from kvstore.codecs.cachegen_params import LEVEL_BINS, CachegenParams, token_multipliers
from kvstore.codecs.cachegen_profile import CachegenProfile, build_profile
from kvstore.codecs.container import Container, SectionData, pack, unpack
from kvstore.errors import CodecError, InvalidInput
from kvstore.models.prompts import sample_passages
from kvstore.quality import QualityHarness
from kvstore.spec import KVSpec, ModelFingerprint
from tests.codecs.test_fuzz import LAYOUT, MLA, Base, Stats, check, flips, header_edits, splices, truncations
from tests.models.real_model import model_threads, require_model  # noqa: F401  (autouse fixture)

NOT_BUILT = "kvstore._rangecoder is not built (needs a C compiler)"
pytestmark = pytest.mark.skipif(not available(), reason=NOT_BUILT)

TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: relative rounding of each dtype (one ulp at most, generous)
EPS = {"bfloat16": 2.0**-8, "float16": 2.0**-10, "float32": 2.0**-22}


def spec(
    dtype: str = "bfloat16", layout: str = "kv_separate", layers: int = 3, heads: int = 2, dim: int = 16
) -> KVSpec:
    heads = 1 if layout == "mla_latent" else heads
    model = ModelFingerprint("test/cachegen")
    return KVSpec(model, layers, heads, dim, dtype, layout)  # type: ignore[arg-type]


def kv(layout: ChunkLayout, seed: int = 0, channel_seed: int | None = None) -> torch.Tensor:
    """KV-like values: channel offsets and scales (from ``channel_seed``, default ``seed``), outliers."""
    shape = layout.shape
    channels = shape[-1] if len(shape) == 3 else shape[-2] * shape[-1]
    g = torch.Generator().manual_seed(seed if channel_seed is None else channel_seed)
    scale, offset = torch.exp(torch.randn(channels, generator=g)), 2 * torch.randn(channels, generator=g)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x = x.reshape(*shape[:-2], -1) * scale + offset if len(shape) == 5 else x * scale + offset
    x.view(-1)[::97] *= 8  # outliers
    return x.reshape(shape).to(TORCH[layout.spec.dtype])


def raw(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().view(-1).view(torch.uint8).numpy()


def decode(codec: CachegenCodec, blob: bytes, layout: ChunkLayout) -> torch.Tensor:
    out = np.full(layout.nbytes, 0xA5, np.uint8)  # poisoned: every byte must be written
    assert codec.decode_into(blob, out) == layout
    return torch.from_numpy(out).view(TORCH[layout.spec.dtype]).reshape(layout.shape)


def section(c: Container, name: str) -> bytes:
    """A section's bytes, decompressed where the container holds a zstd frame."""
    data = bytes(c.section(name))
    return zstandard.ZstdDecompressor().decompress(data) if name in META_SECTIONS else data


def steps(c: Container, layout: ChunkLayout) -> torch.Tensor:
    """Each value's quantization step, broadcast to the chunk's shape."""
    qparams = section(c, "qparams")
    n = len(qparams) // 4
    words = np.frombuffer(qparams, "<u2")[n:].astype(np.int32) << 16
    step = torch.from_numpy(words.copy()).view(torch.float32)
    s = layout.shape
    if len(s) == 5:
        per = step.reshape(s[0], 2, 1, s[3], s[4]).expand(s)
    else:
        per = step.reshape(s[0], 1, s[2]).expand(s)
    if "tscale" not in {x.name for x in c.sections}:
        return per
    tq = int(c.params.get("exact_tokens", 1))
    tokens = s[token_axis(layout)]
    exact = min(tq, tokens)
    mult = torch.ones(s[0] * (2 if len(s) == 5 else 1), tokens)
    mult[:, exact:] = torch.from_numpy(token_multipliers(section(c, "tscale")).copy()).reshape(mult.shape[0], -1)
    if len(s) == 5:
        return per * mult.reshape(s[0], 2, tokens, 1, 1)
    return per * mult.reshape(s[0], tokens, 1)


def token_axis(layout: ChunkLayout) -> int:
    return 2 if layout.spec.layout == "kv_separate" else 1


def check_error_bound(
    x: torch.Tensor, y: torch.Tensor, c: Container, layout: ChunkLayout, exact: int
) -> None:
    ax = token_axis(layout)
    rest = x.shape[ax] - exact
    xs, ys = x.float().narrow(ax, exact, rest), y.float().narrow(ax, exact, rest)
    st = steps(c, layout).narrow(ax, exact, rest)
    bound = 0.5 * st * (1 + 1e-5) + EPS[layout.spec.dtype] * torch.maximum(xs.abs(), ys.abs()) + 1e-30
    assert bool(((xs - ys).abs() <= bound).all()), float(((xs - ys).abs() / st).max())
    assert torch.equal(x.narrow(ax, 0, exact), y.narrow(ax, 0, exact))  # exact tokens, bit for bit


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("kind", ["kv_separate", "mla_latent"])
@pytest.mark.parametrize(("tokens", "exact", "group"), [(1, 1, 32), (5, 0, 7), (40, 3, 1), (64, 1, 4096)])
def test_round_trip_shapes_dtypes_layouts_and_error_bound(
    dtype: str, kind: str, tokens: int, exact: int, group: int
) -> None:
    layout = ChunkLayout(spec(dtype, kind), tokens)
    codec = CachegenCodec({"exact_tokens": exact, "group": group})
    x = kv(layout, seed=tokens)
    blob = codec.encode(raw(x), layout)
    c = unpack(blob)
    assert c.codec == "cachegen" and tuple(s.name for s in c.sections) == SCALED_SECTION_NAMES
    y = decode(codec, blob, layout)
    assert y.shape == x.shape and y.dtype == x.dtype
    check_error_bound(x, y, c, layout, min(exact, tokens))


def test_registered_and_params() -> None:
    assert "cachegen" in codec_names()
    assert make_codec("cachegen", {"level": 2}).params["format"] == 4  # per-token step codes by default
    codec = make_codec("cachegen", {"level": 2, "token_scale": False})
    assert codec.params == {
        "format": 2,
        "level": 2,
        "exact_tokens": 1,
        "group": 32,
        "layer_ramp": 1.0,
        "profile": "",
        "rope_theta": 0.0,
    }
    bad_params: list[CodecParams] = [
        {"level": 99},
        {"group": 0},
        {"bogus": 1},
        {"profile": "../x"},
        {"layer_ramp": 0.5},
        {"exact_tokens": -1},
        {"level": "1"},
        {"rope_theta": 0.5},
        {"rope_theta": "1e4"},
        {"format": 5},
        {"token_scale": 1},
        {"token_scale": True, "format": 4},
        {"format": 1, "rope_theta": 1e4},
        {"transform": "0" * 32},  # never configured: it comes with the profile
    ]
    for bad in bad_params:
        with pytest.raises(InvalidInput):
            make_codec("cachegen", bad)


def test_refuses_bad_input() -> None:
    layout = ChunkLayout(spec(), 8)
    codec = CachegenCodec()
    x = kv(layout)
    with pytest.raises(InvalidInput):
        codec.encode(raw(x)[:-2], layout)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[1, 0, 3, 1, 5] = bad  # a quantized token (the exact first token is stored verbatim)
        with pytest.raises(InvalidInput):
            codec.encode(raw(y), layout)
    int8 = ChunkLayout(spec("int8"), 8)
    with pytest.raises(InvalidInput):
        codec.encode(np.zeros(int8.nbytes, np.uint8), int8)
    with pytest.raises(InvalidInput):
        codec.decode_into(codec.encode(raw(x), layout), np.empty(layout.nbytes - 1, np.uint8))


def test_constant_and_extreme_channels() -> None:
    layout = ChunkLayout(spec("float32"), 16)
    x = kv(layout).float()
    x[0, 0, :, 0, 0] = 3.25  # constant channel: exact
    x[1, 1, :, 1, 3] = 0.0
    x[2, 0, :, 0, 5] = torch.linspace(-1.0, 1.0, 16) * 3e38  # range near float32's limit
    x[2, 1, :, 1, 1] = torch.tensor([1e-40, -1e-40] * 8)  # subnormals
    codec = CachegenCodec()
    blob = codec.encode(raw(x), layout)
    y = decode(codec, blob, layout)
    assert torch.equal(y[0, 0, :, 0, 0], x[0, 0, :, 0, 0]) and torch.equal(y[1, 1, :, 1, 3], x[1, 1, :, 1, 3])
    check_error_bound(x, y, unpack(blob), layout, 1)


def test_deterministic() -> None:
    layout = ChunkLayout(spec(), 48)
    x = kv(layout, seed=3)
    a = CachegenCodec({"group": 5}).encode(raw(x), layout)
    b = CachegenCodec({"group": 5}).encode(raw(x.clone()), layout)
    assert a == b
    assert CachegenCodec({"group": 5}).encode(raw(x), layout) == a


def test_levels_trade_size_for_error() -> None:
    layout = ChunkLayout(spec(layers=4, heads=2, dim=32), 256)
    x = kv(layout, seed=5)
    sizes, errors = [], []
    for level in sorted(LEVEL_BINS):
        codec = CachegenCodec({"level": level})
        blob = codec.encode(raw(x), layout)
        sizes.append(len(blob))
        errors.append(float((decode(codec, blob, layout).float() - x.float()).pow(2).mean()))
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert errors == sorted(errors) and len(set(errors)) == len(errors)
    assert layout.nbytes / sizes[1] > 3.0  # default level on Gaussian-like data


def test_layer_ramp_gives_shallow_layers_finer_steps() -> None:
    layout = ChunkLayout(spec(layers=4), 64)
    x = kv(layout, seed=6)
    flat = unpack(CachegenCodec().encode(raw(x), layout))
    ramped = unpack(CachegenCodec({"layer_ramp": 2.0}).encode(raw(x), layout))
    ratio = steps(ramped, layout)[:, :, 0] / steps(flat, layout)[:, :, 0]
    per_layer = ratio.reshape(4, -1).median(dim=-1).values
    assert per_layer[0] == pytest.approx(0.5, rel=0.02) and per_layer[-1] == pytest.approx(1.0, rel=0.02)


# ---------------------------------------------------------------- profiles


@pytest.fixture(scope="module")
def profiled() -> tuple[ChunkLayout, CachegenProfile]:
    layout = ChunkLayout(spec(layers=2, heads=2, dim=32), 256)
    samples = [(raw(kv(layout, seed=100 + i, channel_seed=0)), layout) for i in range(3)]
    return layout, build_profile(samples, CachegenParams(level=1))


def test_profile_changes_size_not_values(profiled: tuple[ChunkLayout, CachegenProfile]) -> None:
    layout, profile = profiled
    plain = CachegenCodec({"level": 1})
    shared = CachegenCodec({"level": 1, "profile": profile.digest}, profiles=[profile])
    for seed in range(3):
        x = kv(layout, seed=seed, channel_seed=0)  # the samples' channel statistics, other values
        a, b = plain.encode(raw(x), layout), shared.encode(raw(x), layout)
        assert len(b) < 0.9 * len(a)
        assert torch.equal(decode(plain, a, layout), decode(shared, b, layout))
        assert unpack(b).params["profile"] == profile.digest
        assert section(unpack(b), "tab_n").count(0) > 0


def test_profile_blob_round_trip_and_directory(
    profiled: tuple[ChunkLayout, CachegenProfile], tmp_path: Path
) -> None:
    layout, profile = profiled
    again = CachegenProfile.from_bytes(profile.to_bytes())
    assert again == profile and again.digest == profile.digest and len(profile.digest) == 32
    path = profile.save(tmp_path)
    assert path.name == f"{profile.digest}.cgprofile"
    x = kv(layout, seed=9)
    blob = CachegenCodec({"profile": profile.digest}, profiles=[profile]).encode(raw(x), layout)
    from_dir = CachegenCodec({"profile_dir": str(tmp_path)})
    assert "profile_dir" not in unpack(blob).params
    plain = CachegenCodec()
    assert torch.equal(decode(from_dir, blob, layout), decode(plain, plain.encode(raw(x), layout), layout))
    with pytest.raises(CodecError, match="not available"):
        CachegenCodec().decode_into(blob, np.empty(layout.nbytes, np.uint8))
    blob_bytes = profile.to_bytes()
    path.write_bytes(blob_bytes[:-1] + bytes([blob_bytes[-1] ^ 1]))  # not the profile it is named after
    with pytest.raises(CodecError):
        CachegenCodec({"profile_dir": str(tmp_path)}).decode_into(blob, np.empty(layout.nbytes, np.uint8))


def test_profile_must_fit(profiled: tuple[ChunkLayout, CachegenProfile]) -> None:
    layout, profile = profiled
    other = ChunkLayout(spec(layers=3), 16)
    with pytest.raises(InvalidInput, match="channels"):
        CachegenCodec({"profile": profile.digest}, profiles=[profile]).encode(raw(kv(other)), other)
    with pytest.raises(InvalidInput, match="level"):
        level2 = CachegenCodec({"level": 2, "profile": profile.digest}, profiles=[profile])
        level2.encode(raw(kv(layout)), layout)
    with pytest.raises(InvalidInput, match="not available"):
        CachegenCodec({"profile": "0" * 32}).encode(raw(kv(layout)), layout)
    for blob in [b"", b"\x80", profile.to_bytes()[:-3], b"\x91\x01"]:
        with pytest.raises(CodecError):
            CachegenProfile.from_bytes(blob)


def test_profile_with_zero_frequency_is_refused(profiled: tuple[ChunkLayout, CachegenProfile]) -> None:
    _, p = profiled
    freq = bytearray(p.freq)
    first, second = int.from_bytes(freq[0:2], "little"), int.from_bytes(freq[2:4], "little")
    freq[0:4] = (0).to_bytes(2, "little") + (first + second).to_bytes(2, "little")
    bad = CachegenProfile(p.level, p.layer_ramp, p.slabs, p.channels, p.lo, p.n, bytes(freq))
    with pytest.raises(CodecError, match="zero"):
        CachegenProfile.from_bytes(bad.to_bytes())


# ---------------------------------------------------------------- corruption


def forged(blob: bytes, name: str, data: bytes, *, frame: bool = False) -> bytes:
    """``blob`` with section ``name`` replaced (zstd-compressed for metadata unless ``frame``: as given)
    and every checksum recomputed, so only the codec can notice."""
    c = unpack(blob)
    if name in META_SECTIONS and not frame:
        data = zstandard.ZstdCompressor().compress(data)
    sections: list[tuple[str, SectionData]] = [
        (s.name, data if s.name == name else bytes(c.section(s.name))) for s in c.sections
    ]
    return pack(c.codec, dict(c.params), c.layout, sections)


@pytest.fixture(scope="module")
def sample() -> tuple[CachegenCodec, ChunkLayout, bytes]:
    layout = ChunkLayout(spec("float32", layers=2, dim=16), 64)
    codec = CachegenCodec({"group": 8})
    return codec, layout, codec.encode(raw(kv(layout, seed=11)), layout)


def test_flipped_or_truncated_container_is_refused(sample: tuple[CachegenCodec, ChunkLayout, bytes]) -> None:
    codec, layout, blob = sample
    out = np.empty(layout.nbytes, np.uint8)
    rng = random.Random(0)
    c = unpack(blob)
    for s in c.sections:  # a flip anywhere in the stream table or the stream data
        for _ in range(5):
            if s.length:
                bad = bytearray(blob)
                bad[s.offset + rng.randrange(s.length)] ^= 1 << rng.randrange(8)
                with pytest.raises(CodecError):
                    codec.decode_into(bytes(bad), out)
    for cut in (0, 10, len(blob) // 2, len(blob) - 1):
        with pytest.raises(CodecError):
            codec.decode_into(blob[:cut], out)


def test_forged_stream_table_is_refused(sample: tuple[CachegenCodec, ChunkLayout, bytes]) -> None:
    codec, layout, blob = sample
    out = np.empty(layout.nbytes, np.uint8)
    offsets = bytes(unpack(blob).section("offsets"))
    rng = random.Random(1)
    for _ in range(40):
        bad = bytearray(offsets)
        bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        with pytest.raises(CodecError):
            codec.decode_into(forged(blob, "offsets", bytes(bad)), out)
    streams = bytes(unpack(blob).section("streams"))
    for data in (streams[:-1], streams + b"\x00", b""):
        with pytest.raises(CodecError):
            codec.decode_into(forged(blob, "streams", data), out)
    for name, data in [
        ("offsets", offsets[:-4]),
        ("tab_n", b"\x00" * len(section(unpack(blob), "tab_n"))),
        ("tab_freq", section(unpack(blob), "tab_freq")[:-2]),
        ("qparams", b"\xff" * 256),
        ("qparams", b"\xff" * 512),  # the right size, NaN means and steps
        ("exact", b""),
    ]:
        with pytest.raises(CodecError):
            codec.decode_into(forged(blob, name, data), out)
    lo = section(unpack(blob), "tab_lo")
    for frame in (
        b"",
        b"garbage!",
        zstandard.ZstdCompressor().compress(lo + b"\x00"),
        bytes(unpack(blob).section("tab_lo"))[:-1],
        zstandard.ZstdCompressor(write_content_size=False).compress(lo),
    ):
        with pytest.raises(CodecError):
            codec.decode_into(forged(blob, "tab_lo", frame, frame=True), out)


def test_forged_stream_data_never_crashes(sample: tuple[CachegenCodec, ChunkLayout, bytes]) -> None:
    """Flipped stream bytes under valid checksums: a CodecError (mostly) or some values, never a crash."""
    codec, layout, blob = sample
    streams = bytes(unpack(blob).section("streams"))
    rng = random.Random(2)
    refused = 0
    for _ in range(60):
        bad = bytearray(streams)
        bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        out = np.empty(layout.nbytes, np.uint8)
        try:
            codec.decode_into(forged(blob, "streams", bytes(bad)), out)
        except CodecError:
            refused += 1
    assert refused >= 40


def test_forged_params_are_refused(sample: tuple[CachegenCodec, ChunkLayout, bytes]) -> None:
    codec, layout, blob = sample
    c = unpack(blob)
    sections: list[tuple[str, SectionData]] = [(s.name, bytes(c.section(s.name))) for s in c.sections]
    out = np.empty(layout.nbytes, np.uint8)
    evil: list[tuple[str, int | str]] = [
        ("group", 0),
        ("group", 9),
        ("exact_tokens", 5),
        ("level", 99),
        ("profile", "zz"),
        ("extra", 1),
    ]
    for key, value in evil:
        with pytest.raises(CodecError):
            codec.decode_into(pack(c.codec, {**c.params, key: value}, c.layout, sections), out)
    with pytest.raises(CodecError):
        codec.decode_into(pack(c.codec, dict(c.params), c.layout, sections[::-1]), out)
    with pytest.raises(CodecError, match="not 'cachegen'"):
        codec.decode_into(make_codec("raw").encode(np.zeros(layout.nbytes, np.uint8), layout), out)


# ---------------------------------------------------------------- the C coder against the reference


def test_c_coder_matches_python_reference() -> None:
    rc = rangecoder()
    rng = np.random.default_rng(7)
    for trial in range(25):
        slabs, tokens, channels = int(rng.integers(1, 4)), int(rng.integers(0, 30)), int(rng.integers(1, 12))
        exact, group = min(int(rng.integers(0, 3)), tokens), int(rng.integers(1, 6))
        x = rng.standard_normal((slabs, tokens, channels)) * rng.uniform(0.01, 50)
        x += rng.uniform(-5, 5, channels)
        src = x.astype(np.float32).tobytes()
        a = np.full(slabs * channels, 1 / float(rng.uniform(0.5, 5)))
        targets = np.concatenate([a, rng.uniform(0, 0.1, slabs * channels)]).tobytes()
        qp = rc.quant_params(src, 2, slabs, tokens, channels, exact, targets, None)
        rounding = int(rng.integers(64, 129))
        sym, lo, n, freq = rc.quantize(src, 2, slabs, tokens, channels, exact, qp, rounding, None, None, None)
        tq = tokens - exact
        tables = [
            ref.table_of(ref.symbols_of_channel(sym, s, c, tq, channels))
            for s in range(slabs)
            for c in range(channels)
        ]
        assert ref.serialize_tables(tables) == (lo, n, freq), trial
        offsets, data = rc.encode_streams(sym, slabs, tq, channels, group, lo, n, freq, None, None, None)
        assert (offsets, data) == ref.encode_streams(sym, slabs, tq, channels, group, tables), trial
        assert ref.decode_streams(offsets, data, slabs, tq, channels, group, tables) == sym
        decoded = rc.decode_symbols(data, offsets, slabs, tq, channels, group, lo, n, freq, None, None, None)
        assert decoded == sym


def test_normalize_keeps_every_seen_symbol() -> None:
    rng = random.Random(3)
    for _ in range(200):
        counts = [rng.choice([0, 0, 1, 2, rng.randrange(1, 10**6)]) for _ in range(rng.randrange(2, 255))]
        counts[0] = counts[0] or 1
        counts[-1] = counts[-1] or 1
        freqs = ref.normalize(counts)
        assert sum(freqs) == 65536 and all((f > 0) == (c > 0) for f, c in zip(freqs, counts))
    skewed = ref.normalize([1] * 254 + [10**9])
    assert sum(skewed) == 65536 and min(skewed) == 1 and max(skewed) <= 65535


def test_decoded_values_match_numpy_dequantization() -> None:
    """The C float16/bfloat16 rounding of ``mean + q * step`` equals numpy's and torch's."""
    rc = rangecoder()
    for dtype in ("float16", "bfloat16"):
        layout = ChunkLayout(spec(dtype, layers=2, dim=32), 64)
        codec = CachegenCodec({"exact_tokens": 0})
        blob = codec.encode(raw(kv(layout, seed=4)), layout)
        c = unpack(blob)
        n = layout.spec.num_layers * 2 * 64
        tables = [section(c, name) for name in ("tab_lo", "tab_n", "tab_freq")]
        streams, offsets = c.section("streams"), c.section("offsets")
        sym = rc.decode_symbols(streams, offsets, 4, 64, 64, 32, *tables, None, None, None)
        q = np.frombuffer(sym, np.uint8).astype(np.float32).reshape(4, 64, 64) - 127
        words = np.frombuffer(section(c, "qparams"), "<u2").astype(np.uint32) << 16
        mu, st = words[:n].view(np.float32).reshape(4, 1, 64), words[n:].view(np.float32).reshape(4, 1, 64)
        st = st * token_multipliers(section(c, "tscale")).reshape(4, 64, 1)  # exact products
        want = torch.from_numpy((mu + q * st).astype(np.float32)).to(TORCH[dtype])
        got = decode(codec, blob, layout).reshape(4, 64, 64)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_threads_decode_alike(sample: tuple[CachegenCodec, ChunkLayout, bytes]) -> None:
    """The C coder runs without the GIL: threads decoding at once agree."""
    codec, layout, blob = sample
    expected = decode(codec, blob, layout)
    results: list[torch.Tensor] = []

    def work() -> None:
        for _ in range(20):
            results.append(decode(codec, blob, layout))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 60 and all(torch.equal(r, expected) for r in results)


# ---------------------------------------------------------------- the real model


def real_chunks(kv: torch.Tensor, tokens: int) -> list[np.ndarray]:
    bf = kv.to(torch.bfloat16)
    return [raw(bf[:, :, t : t + tokens]) for t in range(0, bf.shape[2], tokens)]


def test_real_kv_short_context() -> None:
    """SmolLM2 KV of a 512-token passage: ratios, the profile's gain and the quality of the default level."""
    loaded = require_model()
    ids = [list(p.token_ids) for p in sample_passages(loaded.tokenizer, tokens=544, count=2, seed=0)]
    spec_ = loaded.spec_for("bfloat16")
    harness = QualityHarness(loaded, ids[0][:512], ids[0][512:], greedy_tokens=8)
    other = QualityHarness(loaded, ids[1][:512], ids[1][512:], greedy_tokens=0).reference_kv
    profile = build_profile([(c, ChunkLayout(spec_, 256)) for c in real_chunks(other, 256)], CachegenParams())
    plain, shared = CachegenCodec(), CachegenCodec({"profile": profile.digest}, profiles=[profile])
    sizes = {"plain": 0, "shared": 0}
    for chunk in real_chunks(harness.reference_kv, 256):
        layout = ChunkLayout(spec_, 256)
        sizes["plain"] += len(plain.encode(chunk, layout))
        sizes["shared"] += len(shared.encode(chunk, layout))
    nbytes = 2 * ChunkLayout(spec_, 256).nbytes
    assert nbytes / sizes["plain"] > 3.0 and nbytes / sizes["shared"] > 3.8

    def transform(kv: torch.Tensor) -> torch.Tensor:
        layout = ChunkLayout(spec_, 512)
        blob = plain.encode(real_chunks(kv, 512)[0], layout)
        return decode(plain, blob, layout).float()

    report = harness.evaluate(transform)
    assert report.kl_mean < 0.05 and report.top1_agreement >= 0.85, report.summary()


@pytest.mark.slow
def test_real_kv_recommended_sizes() -> None:
    """2048 context + 256 continuation tokens, default level (about a minute): the measured targets."""
    loaded = require_model()
    ids = list(sample_passages(loaded.tokenizer, tokens=2304, count=1, seed=1)[0].token_ids)
    spec_ = loaded.spec_for("bfloat16")
    harness = QualityHarness(loaded, ids[:2048], ids[2048:])
    layout = ChunkLayout(spec_, 2048)
    codec = CachegenCodec()
    blob = codec.encode(real_chunks(harness.reference_kv, 2048)[0], layout)
    report = harness.evaluate(lambda kv: decode(codec, blob, layout).float())
    print(f"cachegen level 1: x{layout.nbytes / len(blob):.2f}, {report.summary()}")
    assert layout.nbytes / len(blob) > 4.0
    assert report.ppl_delta <= 0.1 and report.top1_agreement >= 0.95 and report.kl_mean < 0.02


def test_fuzz_containers() -> None:
    """tests/codecs/test_fuzz.py's mutations on cachegen containers: decode identically or CodecError."""
    rng = random.Random(11)
    stats = Stats()
    cases: list[tuple[dict[str, Any], ChunkLayout]] = [
        ({"group": 4}, LAYOUT),
        ({"exact_tokens": 2, "level": 3}, MLA),
        ({"rope_theta": 1e4, "group": 5}, LAYOUT),
        ({"token_scale": False, "group": 4}, LAYOUT),  # format 2, without the tscale section
    ]
    for seed, (params, layout) in enumerate(cases):
        base = Base("cachegen", params, layout, seed)
        for what, buf in [*truncations(base), *flips(base, rng, 300), *splices(base, rng, 100)]:
            check(base, buf, stats, what)
        for what, buf, same in header_edits(base):
            check(base, buf, stats, what, same_meaning=same)
    assert stats.rejected >= stats.cases * 0.9, (stats.rejected, stats.cases)
    assert stats.slowest < 0.5
