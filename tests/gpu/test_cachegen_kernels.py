"""Every cachegen kernel (token norms and codes, statistics, quantize, tables/CDF, encode, gather, decode,
RoPE, transform) on a GPU, each launch poisoned and checked: the same bytes as the CPU coder, both ways.

Marker ``gpu``: skipped without CuPy and a CUDA device. Fresh random inputs
each run (seed printed); every device array the coder allocates is filled
with ``POISON`` first and the device is synchronized after every launch.
The same cases run on the CPU through the g++ build in
tests/codecs/test_cachegen_gpu.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.codecs.base import ChunkLayout
from kvstore.codecs.cachegen import CachegenCodec
from kvstore.codecs.cachegen_coder import available
from kvstore.codecs.cachegen_gpu import SIGNATURES, GpuCoder
from kvstore.codecs.cachegen_params import LEVEL_LAMBDA
from kvstore.errors import CodecError, InvalidInput
from kvstore.spec import KVSpec, ModelFingerprint
from tests.codecs.test_cachegen import forged, kv, raw, spec
from tests.codecs.test_cachegen_gpu import cases, check_both_ways, cpu_decode, profiled, transformed_cases
from tests.gpu.checked import POISON, CheckedCupyBackend, fresh_seed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not available(), reason="kvstore._rangecoder is not built (needs a C compiler)"),
]


@pytest.fixture(scope="module")
def gpu() -> CheckedCupyBackend:
    try:
        return CheckedCupyBackend()
    except CodecError as exc:
        pytest.skip(f"no GPU for the cachegen kernels: {exc}")


def poisoned_out(gpu: CheckedCupyBackend, layout: ChunkLayout) -> object:
    return gpu.upload(np.full(layout.nbytes, POISON, np.uint8))


def test_every_kernel_matches_the_cpu_coder(gpu: CheckedCupyBackend) -> None:
    seed = fresh_seed("cachegen GPU")
    for codec, layout, x in cases(seed):
        check_both_ways(GpuCoder(codec, gpu), layout, x, poisoned_out(gpu, layout))
    for codec, layout, x in transformed_cases(seed):
        check_both_ways(GpuCoder(codec, gpu), layout, x, poisoned_out(gpu, layout))
    for calibrated, level, theta in [(False, 1, 0.0), (True, 1, 0.0), (True, max(LEVEL_LAMBDA), 1e4)]:
        codec, layout, xs = profiled(seed, calibrated, level, theta)
        for x in xs:
            check_both_ways(GpuCoder(codec, gpu), layout, x, poisoned_out(gpu, layout))
    assert set(gpu.launches) == set(SIGNATURES)


def test_token_codes_at_the_extremes(gpu: CheckedCupyBackend) -> None:
    layout = ChunkLayout(spec("float32", layers=2, heads=3, dim=8), 48)
    x = kv(layout, seed=fresh_seed("cachegen extremes")).float()
    x = x * torch.exp2(torch.linspace(-20, 20, 48)).reshape(1, 1, 48, 1, 1)
    x[:, :, 5] = 0.0
    x[1, 1, 7] = 1e-30
    check_both_ways(GpuCoder(CachegenCodec({"group": 6}), gpu), layout, x, poisoned_out(gpu, layout))


def test_decoder_refuses_what_the_cpu_refuses(gpu: CheckedCupyBackend) -> None:
    layout = ChunkLayout(spec("float32", layers=2, dim=16), 32)
    codec = CachegenCodec({"group": 8})
    coder = GpuCoder(codec, gpu)
    blob = codec.encode(raw(kv(layout, seed=fresh_seed("cachegen refusals"))), layout)
    from kvstore.codecs.container import unpack

    c = unpack(blob)
    streams = bytes(c.section("streams"))
    out = np.empty(layout.nbytes, np.uint8)
    for name, data in [
        ("offsets", bytes(c.section("offsets"))[:-4]),
        ("streams", streams[:-1]),
        ("streams", bytes([streams[0] ^ 0x40]) + streams[1:]),
    ]:
        bad = forged(blob, name, data)
        with pytest.raises(CodecError):
            codec.decode_into(bad, out)
        with pytest.raises(CodecError):
            coder.decode_into(bad, poisoned_out(gpu, layout))
    x = kv(layout)
    x[1, 0, 5, 0, 0] = float("nan")
    with pytest.raises(InvalidInput):
        coder.encode(gpu.upload(raw(x)), layout)


def test_full_size_chunks_from_device_memory(gpu: CheckedCupyBackend) -> None:
    """SmolLM2-sized chunks (2048 and 256 tokens) encoded from and decoded into device arrays."""
    seed = fresh_seed("cachegen full size")
    spec_ = KVSpec(ModelFingerprint("smollm2-like"), 30, 3, 64, "bfloat16")
    for tokens in (2048, 256):
        layout = ChunkLayout(spec_, tokens)
        codec = CachegenCodec()
        coder = GpuCoder(codec, gpu)
        x = kv(layout, seed=seed + tokens)
        blob = coder.encode(gpu.upload(raw(x)), layout)
        assert blob == codec.encode(raw(x), layout)
        out = poisoned_out(gpu, layout)
        coder.decode_into(blob, out)
        assert np.array_equal(gpu.download(out), cpu_decode(codec, blob, layout))
