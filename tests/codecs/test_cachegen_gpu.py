"""cachegen's CUDA kernels give the CPU coder's bytes: on a GPU (marker ``gpu``) and emulated on the CPU.

On a GPU (CuPy + a CUDA device) every check runs on fresh random inputs
(the seed is printed) with poisoned outputs, in both directions: the GPU
encodes exactly the CPU's container, the CPU decodes the GPU's and the GPU
decodes the CPU's to exactly the CPU's values. Without a GPU the same source
is compiled by g++ with ``-DCG_EMULATE`` (each kernel becomes one CPU loop)
and driven through the same :class:`GpuCoder`, which checks the
orchestration, the indexing and the arithmetic everywhere but on the device.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import kvstore.codecs  # noqa: F401  # registers the codecs
from kvstore.codecs.base import ChunkLayout, CodecParams
from kvstore.codecs.cachegen import CachegenCodec
from kvstore.codecs.cachegen_coder import available, rangecoder
from kvstore.codecs.cachegen_gpu import KERNEL_SOURCE, SIGNATURES, Array, CupyBackend, GpuCoder
from kvstore.codecs.cachegen_params import LEVEL_LAMBDA, CachegenParams
from kvstore.codecs.cachegen_profile import build_profile
from kvstore.codecs.cachegen_transform import HeadStatistics, HeadTransform, build_transform
from kvstore.codecs.container import unpack
from kvstore.errors import CodecError, InvalidInput
from kvstore.spec import KVSpec, ModelFingerprint
from tests.codecs.test_cachegen import forged, kv, raw, section, spec
from tests.kernel_emulation import build_emulated

pytestmark = pytest.mark.skipif(
    not available(), reason="kvstore._rangecoder is not built (needs a C compiler)"
)
POISON = 0xA5


class EmulatedBackend:
    """The kernel source compiled as C++ (``-DCG_EMULATE``): every launch is one loop on the CPU."""

    def __init__(self, library: Path) -> None:
        self.lib = ctypes.CDLL(str(library))
        self.launches: list[str] = []

    def upload(self, host: np.ndarray) -> Array:
        return np.array(host, copy=True, order="C")

    def empty(self, size: int, dtype: type[np.generic]) -> Array:
        out = np.empty(max(size, 1), dtype)
        out.view(np.uint8)[:] = POISON
        return out

    def download(self, array: Array) -> np.ndarray:
        return np.asarray(array)

    def launch(self, kernel: str, items: int, *args: Array | int) -> None:
        if items <= 0:
            return
        fn = getattr(self.lib, kernel)
        fn.restype = None
        fn(*[_c_arg(k, a) for k, a in zip(SIGNATURES[kernel], args, strict=True)])
        self.launches.append(kernel)


def _c_arg(kind: str, value: Array | int) -> object:
    if isinstance(value, int):
        return ctypes.c_int(value) if kind == "i" else ctypes.c_longlong(value)
    return ctypes.c_void_p(value.ctypes.data)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> EmulatedBackend:
    lib = build_emulated(KERNEL_SOURCE, "CG_EMULATE", tmp_path_factory)
    return EmulatedBackend(lib)


@pytest.fixture(scope="module")
def gpu() -> CupyBackend:
    try:
        return CupyBackend()
    except CodecError as exc:
        pytest.skip(f"no GPU for the cachegen kernels: {exc}")


CASES: list[tuple[str, str, int, int, int, int, CodecParams]] = [  # dtype, layout, layers, heads, dim, tokens
    ("bfloat16", "kv_separate", 3, 2, 16, 40, {}),
    ("float16", "kv_separate", 2, 3, 8, 17, {"group": 5, "exact_tokens": 2, "level": 0}),
    ("float32", "mla_latent", 2, 1, 24, 9, {"group": 1, "exact_tokens": 0, "level": 3}),
    ("bfloat16", "kv_separate", 2, 2, 32, 1, {"level": 4}),
    ("bfloat16", "kv_separate", 2, 2, 16, 64, {"group": 4096, "layer_ramp": 2.0}),
    ("bfloat16", "kv_separate", 2, 2, 16, 40, {"rope_theta": 10000.0}),
    ("float16", "kv_separate", 2, 3, 8, 17, {"rope_theta": 1e5, "exact_tokens": 0, "group": 7}),
    ("float32", "kv_separate", 1, 1, 4, 5, {"rope_theta": 500.0, "exact_tokens": 2}),
    ("bfloat16", "kv_separate", 3, 2, 16, 40, {"token_scale": False}),  # format 2, as earlier versions
    ("float16", "kv_separate", 2, 3, 8, 17, {"rope_theta": 1e5, "token_scale": False}),
]


def cases(seed: int) -> Iterator[tuple[CachegenCodec, ChunkLayout, torch.Tensor]]:
    for i, (dtype, kind, layers, heads, dim, tokens, params) in enumerate(CASES):
        layout = ChunkLayout(spec(dtype, kind, layers, heads, dim), tokens)
        yield CachegenCodec(params), layout, kv(layout, seed=seed + i)


def profiled(
    seed: int, calibrated: bool = False, level: int = 1, rope_theta: float = 0.0
) -> tuple[CachegenCodec, ChunkLayout, list[torch.Tensor]]:
    """A codec with a profile (with a random sensitivity when ``calibrated``) and chunks it fits."""
    layout = ChunkLayout(spec(layers=2, heads=2, dim=16), 48)
    samples = [(raw(kv(layout, seed=seed + i, channel_seed=seed)), layout) for i in range(2)]
    wanted = 0.5 * np.exp(np.random.default_rng(seed).uniform(-2.5, 0.5, 2 * 2 * 32))
    sensitivity = (LEVEL_LAMBDA[level] / wanted) ** 2 if calibrated else None
    params = CachegenParams(level=level, rope_theta=rope_theta)
    profile = build_profile(samples, params, sensitivity=sensitivity)
    config: CodecParams = {"level": level, "profile": profile.digest, "rope_theta": rope_theta}
    codec = CachegenCodec(config, profiles=[profile])
    return codec, layout, [kv(layout, seed=seed + 10 + i, channel_seed=seed) for i in range(2)]


def random_transform(slabs: int, heads: int, dim: int, seed: int) -> HeadTransform:
    """A per-head transform from random (Fisher, covariance) statistics."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(2, slabs, heads, dim, dim))
    fisher, cov = a @ a.transpose(0, 1, 3, 2) * 1e-9, b @ b.transpose(0, 1, 3, 2)
    return build_transform(HeadStatistics(fisher, cov))


def transformed(
    seed: int,
    dtype: str = "bfloat16",
    rope_theta: float = 0.0,
    tables: bool = True,
    exact: int = 1,
    tokens: int = 40,
) -> tuple[CachegenCodec, ChunkLayout, list[torch.Tensor]]:
    """A codec whose profile has a per-head transform, and chunks it fits."""
    layout = ChunkLayout(spec(dtype, layers=2, heads=2, dim=16), tokens)
    samples = [(raw(kv(layout, seed=seed + i, channel_seed=seed)), layout) for i in range(2)]
    params = CachegenParams(level=1, rope_theta=rope_theta, exact_tokens=exact)
    profile = build_profile(samples, params, transform=random_transform(4, 2, 16, seed))
    config: CodecParams = {"profile": profile.digest, "rope_theta": rope_theta, "exact_tokens": exact}
    codec = CachegenCodec({**config, "profile_tables": tables}, profiles=[profile])
    return codec, layout, [kv(layout, seed=seed + 10 + i, channel_seed=seed) for i in range(2)]


def transformed_cases(seed: int) -> Iterator[tuple[CachegenCodec, ChunkLayout, torch.Tensor]]:
    for i, (dtype, theta, tables, exact, tokens) in enumerate(
        [("bfloat16", 0.0, True, 1, 40), ("float16", 1e4, False, 0, 17), ("float32", 1e5, True, 2, 9)]
    ):
        codec, layout, xs = transformed(seed + i, dtype, theta, tables, exact, tokens)
        yield codec, layout, xs[0]
        if i == 0:  # format 3: the transform without step codes
            config = {k: v for k, v in codec.params.items() if k != "format"}
            profile = codec.profiles.get(codec.config.profile, CodecError)
            yield CachegenCodec({**config, "token_scale": False}, profiles=[profile]), layout, xs[1]


def cpu_decode(codec: CachegenCodec, blob: bytes, layout: ChunkLayout) -> np.ndarray:
    out = np.full(layout.nbytes, POISON, np.uint8)
    codec.decode_into(blob, out)
    return out


def check_both_ways(
    coder: GpuCoder, layout: ChunkLayout, x: torch.Tensor, device_out: Array | None = None
) -> None:
    """GPU encode == CPU encode; GPU decode of it == CPU decode; symbols agree."""
    codec = coder.codec
    cpu_blob = codec.encode(raw(x), layout)
    gpu_blob = coder.encode(raw(x), layout)
    assert gpu_blob == cpu_blob
    want = cpu_decode(codec, cpu_blob, layout)
    host_out = np.full(layout.nbytes + 3, POISON, np.uint8)
    assert coder.decode_into(cpu_blob, host_out) == layout
    assert np.array_equal(host_out[: layout.nbytes], want) and (host_out[layout.nbytes :] == POISON).all()
    if device_out is not None:
        coder.decode_into(gpu_blob, device_out)
        assert np.array_equal(coder.b.download(device_out)[: layout.nbytes], want)
    c = unpack(cpu_blob)
    g_tabs = [section(c, n) for n in ("tab_lo", "tab_n", "tab_freq")]
    p = codec.config
    slabs = layout.spec.num_layers * layout.spec.kv_factor
    channels = layout.spec.num_kv_heads * layout.spec.head_dim
    tq = layout.num_tokens - min(p.exact_tokens, layout.num_tokens)
    profile = codec.profiles.get(p.profile, CodecError) if p.profile else None
    prof = (profile.lo, profile.n, profile.freq) if profile else (None, None, None)
    sym = rangecoder().decode_symbols(
        c.section("streams"), c.section("offsets"), slabs, tq, channels, p.group, *g_tabs, *prof
    )
    assert coder.decode_symbols(gpu_blob) == sym


# ---------------------------------------------------------------- emulated on the CPU


def test_emulated_kernels_match_the_cpu_coder(emulated: EmulatedBackend) -> None:
    for codec, layout, x in cases(seed=0):
        check_both_ways(GpuCoder(codec, emulated), layout, x)
    for codec, layout, x in transformed_cases(seed=0):
        check_both_ways(GpuCoder(codec, emulated), layout, x)
    assert set(emulated.launches) == set(SIGNATURES)


@pytest.mark.parametrize(("tokens", "dim"), [(11, 20), (13, 32)])  # the C coder's blocked path: D % 16 == 0
def test_emulated_transform_kernel_matches_the_cpu_coder(
    emulated: EmulatedBackend, tokens: int, dim: int
) -> None:
    """cg_transform == kvstore._rangecoder.transform bit for bit, with and without constant channels."""
    rng = np.random.default_rng(4)
    slabs, exact, heads = 3, 2, 2
    x = rng.normal(size=(slabs, tokens, heads, dim)).astype(np.float32)
    live = (rng.random(slabs * heads * dim) < 0.6).astype(np.uint8)
    x = np.where(live.reshape(slabs, 1, heads, dim) == 0, x[:, exact : exact + 1], x)  # constant channels
    m = rng.normal(size=(slabs, heads, dim, dim)) * 10.0 ** rng.integers(-3, 3, (slabs, heads, dim, dim))
    m = m.astype(np.float32)
    for flags in (None, live):
        want = np.zeros_like(x)
        rangecoder().transform(x, want, slabs, tokens, exact, heads, dim, m.tobytes(), flags)
        got = emulated.empty(x.size, np.float32)
        have = flags if flags is not None else np.zeros(1, np.uint8)
        geo = (slabs, tokens, exact, heads, dim)
        emulated.launch("cg_transform", x[:, exact:].size, x, got, *geo, m, have, int(flags is not None))
        assert np.array_equal(
            got.reshape(x.shape)[:, exact:].view(np.uint32), want[:, exact:].view(np.uint32)
        )
    ref = np.einsum("shde,sthe->sthd", m.astype(np.float64), x.astype(np.float64))[:, exact:]
    assert np.allclose(want[:, exact:], ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max())


def test_emulated_token_codes_at_the_extremes(emulated: EmulatedBackend) -> None:
    """Tokens over +-8 octaves (clamped codes), all-zero tokens (code 0) and tiny values: same bytes."""
    layout = ChunkLayout(spec("float32", layers=2, heads=3, dim=8), 48)
    x = kv(layout, seed=12).float()
    scale = torch.exp2(torch.linspace(-20, 20, 48))
    x = x * scale.reshape(1, 1, 48, 1, 1)
    x[:, :, 5] = 0.0
    x[1, 1, 7] = 1e-30  # subnormal in float32 squared, not in float64
    codec = CachegenCodec({"group": 6})
    check_both_ways(GpuCoder(codec, emulated), layout, x)
    codes = section(unpack(codec.encode(raw(x), layout)), "tscale")
    assert min(codes) != max(codes) and b"\xf8" in codes and b"\x08" in codes  # -8 and 8 both used


def test_emulated_kernels_with_a_profile(emulated: EmulatedBackend) -> None:
    for calibrated, level, theta in [(False, 1, 0.0), (True, 1, 0.0), (True, max(LEVEL_LAMBDA), 1e4)]:
        codec, layout, xs = profiled(seed=3, calibrated=calibrated, level=level, rope_theta=theta)
        for x in xs:
            check_both_ways(GpuCoder(codec, emulated), layout, x)
            assert section(unpack(codec.encode(raw(x), layout)), "tab_n").count(0) > 0


def test_emulated_decoder_refuses_what_the_cpu_refuses(emulated: EmulatedBackend) -> None:
    layout = ChunkLayout(spec("float32", layers=2, dim=16), 32)
    codec = CachegenCodec({"group": 8})
    coder = GpuCoder(codec, emulated)
    blob = codec.encode(raw(kv(layout, seed=5)), layout)
    c = unpack(blob)
    out = np.empty(layout.nbytes, np.uint8)
    streams = bytes(c.section("streams"))
    for name, data in [
        ("offsets", bytes(c.section("offsets"))[:-4]),
        ("streams", streams[:-1]),
        ("tab_freq", section(c, "tab_freq")[:-2]),
        ("qparams", b"\xff" * len(section(c, "qparams"))),
        ("tab_n", b"\x00" * len(section(c, "tab_n"))),
        ("streams", bytes([streams[0] ^ 0x40]) + streams[1:]),
    ]:
        bad = forged(blob, name, data)
        with pytest.raises(CodecError):
            codec.decode_into(bad, out)
        with pytest.raises(CodecError):
            coder.decode_into(bad, out)
    with pytest.raises(InvalidInput):
        coder.decode_into(blob, np.empty(layout.nbytes - 1, np.uint8))
    x = kv(layout)
    x[1, 0, 5, 0, 0] = float("nan")
    with pytest.raises(InvalidInput):
        coder.encode(raw(x), layout)


def test_real_geometry_emulated(emulated: EmulatedBackend) -> None:
    """SmolLM2's geometry (30 layers, 3 kv heads, head dim 64), 64 tokens, default params."""
    layout = ChunkLayout(KVSpec(ModelFingerprint("smollm2-like"), 30, 3, 64, "bfloat16"), 64)
    check_both_ways(GpuCoder(CachegenCodec(), emulated), layout, kv(layout, seed=8))


# ---------------------------------------------------------------- on a GPU


def fresh_seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"cachegen GPU test seed {seed}")
    return seed


@pytest.mark.gpu
def test_gpu_streams_match_cpu_both_ways(gpu: CupyBackend) -> None:
    seed = fresh_seed()
    for codec, layout, x in cases(seed):
        device_out = gpu.upload(np.full(layout.nbytes, POISON, np.uint8))
        check_both_ways(GpuCoder(codec, gpu), layout, x, device_out)
    for calibrated, level, theta in [(False, 1, 0.0), (True, 1, 0.0), (True, max(LEVEL_LAMBDA), 1e4)]:
        codec, layout, xs = profiled(seed, calibrated, level, theta)
        for x in xs:
            device_out = gpu.upload(np.full(layout.nbytes, POISON, np.uint8))
            check_both_ways(GpuCoder(codec, gpu), layout, x, device_out)


@pytest.mark.gpu
def test_gpu_full_size_chunks_and_timing(gpu: CupyBackend) -> None:
    """SmolLM2-sized chunks (2048 and 256 tokens) of fresh values: identical bytes, timings printed."""
    seed = fresh_seed()
    spec_ = KVSpec(ModelFingerprint("smollm2-like"), 30, 3, 64, "bfloat16")
    for tokens in (2048, 256):
        layout = ChunkLayout(spec_, tokens)
        codec = CachegenCodec()
        coder = GpuCoder(codec, gpu)
        x = kv(layout, seed=seed + tokens)
        device_in = gpu.upload(raw(x))
        device_out = gpu.upload(np.full(layout.nbytes, POISON, np.uint8))
        check_both_ways(coder, layout, x, device_out)
        t0 = time.perf_counter()
        blob = coder.encode(device_in, layout)
        t1 = time.perf_counter()
        coder.decode_into(blob, device_out)
        gpu.cp.cuda.Device().synchronize()
        t2 = time.perf_counter()
        print(
            f"{tokens} tokens: GPU encode {layout.nbytes / (t1 - t0) / 1e6:.0f} MB/s, "
            f"decode {layout.nbytes / (t2 - t1) / 1e6:.0f} MB/s (host round trips included)"
        )
        assert np.array_equal(gpu.download(device_out), cpu_decode(codec, blob, layout))
