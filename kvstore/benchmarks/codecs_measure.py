"""The measurements of `kvstore bench codecs`: size, CPU speed against zstd-1, and quality.

Everything is measured on the bfloat16 chunks a store holds (the model's KV
rounded to bfloat16), so the reference of the quality columns is that KV
itself: a lossless codec scores KL 0, top-1 1.0 and a perplexity delta of
exactly 0. Prompt sampling, prefill, chunking and profile building come from
``kvstore.codecs.cachegen_bench``; cachegen's setup (calibrated by default)
from ``kvstore.benchmarks.codecs_variants``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from kvstore.benchmarks.codecs_variants import CachegenCodecs, CachegenSetup, Variant, cachegen_codecs
from kvstore.benchmarks.common import Case, Timing, measure_interleaved
from kvstore.buffers import U8
from kvstore.codecs.base import ChunkLayout, Codec, make_codec
from kvstore.codecs.cachegen import CachegenCodec
from kvstore.codecs.cachegen_bench import mean_report, ratio, roundtrip, to_chunks
from kvstore.quality import KVTransform, QualityHarness
from kvstore.spec import KVSpec

#: the store's chunk size: speed and quality are measured on chunks of this many tokens
STORE_CHUNK = 256
#: the long chunk of the size comparison
LONG_CHUNK = 2048
ZSTD_LEVEL = 1


class StoredKVHarness(QualityHarness):
    """A quality harness whose reference is the context's KV as a store holds it: bfloat16.

    Invariants: ``reference_kv`` is ``float32_kv`` rounded to bfloat16 (held as
    float32), so a transform that returns it unchanged scores exactly KL 0,
    top-1 1.0 and perplexity delta 0; ``float32_kv`` is the prefill's own KV.
    """

    float32_kv: torch.Tensor

    def _prefill(self) -> torch.Tensor:
        self.float32_kv = super()._prefill()
        return self.float32_kv.to(torch.bfloat16).float()


@dataclass(frozen=True, slots=True)
class Quality:
    """Quality of a variant, each field the mean over the prompts (``kvstore.quality`` definitions)."""

    kl: float
    top1: float
    ppl_delta: float
    greedy_match: float


@dataclass(frozen=True, slots=True)
class Speed:
    """Median MB/s (10^6 bytes of bfloat16 chunk per second) of one codec and of zstd-1 in the same rounds."""

    encode_mbps: float
    decode_mbps: float
    zstd_encode_mbps: float
    zstd_decode_mbps: float

    @property
    def encode_vs_zstd(self) -> float:
        return self.encode_mbps / self.zstd_encode_mbps

    @property
    def decode_vs_zstd(self) -> float:
        return self.decode_mbps / self.zstd_decode_mbps


@dataclass(frozen=True, slots=True)
class VariantResult:
    """Everything measured for one variant.

    ``ratio_256`` uses the shared profile for cachegen (``ratio_256_own_tables``
    is without it; None for other codecs); ``gpu`` holds the CUDA path's speed
    when one was measured (its ``zstd_*`` fields are the CPU baseline).
    """

    variant: Variant
    ratio_2048: float
    ratio_256: float
    ratio_256_own_tables: float | None
    quality: Quality
    speed: Speed
    gpu: Speed | None = None
    profile_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Inputs:
    """What every variant is measured on: the prompts' harnesses, the calibration prompts' KV
    (cachegen's profiles) and cachegen's setup (calibrated on those same prompts, or not)."""

    spec: KVSpec
    harnesses: Sequence[StoredKVHarness]
    calibration: Sequence[torch.Tensor]
    iters: int
    warmup: int
    cachegen: CachegenSetup

    def contexts(self) -> list[torch.Tensor]:
        return [h.reference_kv for h in self.harnesses]

    def store_chunks(self) -> list[U8]:
        """The full 256-token bfloat16 chunks of every context (the speed measurements' data)."""
        size = self.spec.chunk_nbytes(STORE_CHUNK)
        return [raw for kv in self.contexts() for raw in to_chunks(kv, STORE_CHUNK) if raw.size == size]


def layout_of(spec: KVSpec, raw: U8) -> ChunkLayout:
    return ChunkLayout(spec, raw.size // spec.bytes_per_token)


def zstd_ratio(kvs: Sequence[torch.Tensor], chunk_tokens: int) -> float:
    """bfloat16 bytes over zstd-1 frame bytes of the same chunks (no shuffle, no container)."""
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    raw_bytes = coded = 0
    for kv in kvs:
        for raw in to_chunks(kv, chunk_tokens):
            raw_bytes += raw.size
            coded += len(cctx.compress(raw.data))
    return raw_bytes / coded


def cpu_speed(codec: Codec, chunks: Sequence[U8], spec: KVSpec, iters: int, warmup: int) -> Speed:
    """Encode and decode of one chunk at a time, round-robin with zstd-1 on the same chunk; one thread."""
    layout = layout_of(spec, chunks[0])
    cctx, dctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL), zstandard.ZstdDecompressor()
    blobs = [codec.encode(c, layout) for c in chunks]
    frames = [cctx.compress(c.data) for c in chunks]
    out = np.empty(layout.nbytes, np.uint8)
    n = len(chunks)
    cases = {
        "encode": Case(lambda i: codec.encode(chunks[i % n], layout)),
        "decode": Case(lambda i: codec.decode_into(blobs[i % n], out)),
        "zstd_encode": Case(lambda i: cctx.compress(chunks[i % n].data)),
        "zstd_decode": Case(lambda i: dctx.decompress(frames[i % n])),
    }
    t = measure_interleaved(cases, iters=iters, warmup=warmup)
    return _speed(t, layout.nbytes)


def gpu_speed(codec: Codec, chunks: Sequence[U8], spec: KVSpec, iters: int, warmup: int) -> Speed | None:
    """cachegen's CUDA path (``cachegen_gpu.GpuCoder``) from and into device memory; None for other codecs.

    Raises:
        CodecError: CuPy or a CUDA device is missing.
    """
    if not isinstance(codec, CachegenCodec):
        return None
    from kvstore.codecs.cachegen_gpu import GpuCoder

    coder = GpuCoder(codec)
    layout = layout_of(spec, chunks[0])
    device = [coder.b.upload(c) for c in chunks]
    blobs = [codec.encode(c, layout) for c in chunks]
    out = coder.b.empty(layout.nbytes, np.uint8)
    cctx, dctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL), zstandard.ZstdDecompressor()
    frames = [cctx.compress(c.data) for c in chunks]
    n = len(chunks)

    def decode(i: int) -> None:
        coder.decode_into(blobs[i % n], out)
        torch.cuda.synchronize()  # the kernels run asynchronously; wait for the whole device

    cases = {
        "encode": Case(lambda i: coder.encode(device[i % n], layout)),  # returns host bytes: synchronous
        "decode": Case(decode),
        "zstd_encode": Case(lambda i: cctx.compress(chunks[i % n].data)),
        "zstd_decode": Case(lambda i: dctx.decompress(frames[i % n])),
    }
    t = measure_interleaved(cases, iters=iters, warmup=warmup)
    return _speed(t, layout.nbytes)


def _speed(t: dict[str, Timing], nbytes: int) -> Speed:
    mbps = [t[name].rate(nbytes) / 1e6 for name in ("encode", "decode", "zstd_encode", "zstd_decode")]
    return Speed(*mbps)


def quality(harnesses: Sequence[StoredKVHarness], transform: KVTransform) -> Quality:
    """The mean report of ``transform`` over every prompt."""
    means = mean_report([h.evaluate(transform) for h in harnesses])
    return Quality(means["kl_mean"], means["top1"], means["ppl_delta"], means["greedy_match"])


def float32_quality(harnesses: Sequence[StoredKVHarness]) -> tuple[Quality, float]:
    """The prefill's own float32 KV against the bfloat16 reference (what bfloat16 storage itself
    costs), and the reference's perplexity, both means over the prompts."""
    reports = [h.evaluate_kv(h.float32_kv) for h in harnesses]
    means = mean_report(reports)
    quality = Quality(means["kl_mean"], means["top1"], means["ppl_delta"], means["greedy_match"])
    return quality, float(np.mean([r.ppl_reference for r in reports]))


def cachegen_for(variant: Variant, inputs: Inputs) -> CachegenCodecs | None:
    """The profile and codecs of a cachegen variant in the run's setup, else None."""
    if not variant.profile:
        return None
    return cachegen_codecs(variant, inputs.cachegen, inputs.calibration, inputs.spec)


def codecs_of(variant: Variant, cachegen: CachegenCodecs | None) -> tuple[Codec, Codec]:
    """(the codec for long chunks, the codec a store would use for 256-token chunks)."""
    if cachegen is None:
        codec = make_codec(variant.codec, variant.params)
        return codec, codec
    return cachegen.inline, cachegen.stored


def measure_variant(variant: Variant, inputs: Inputs, *, gpu: bool = False) -> VariantResult:
    """Size at 2048 and 256 tokens, quality at 256-token chunks, speed at 256-token chunks.

    cachegen: ``ratio_2048`` and ``ratio_256_own_tables`` with inline tables, the rest with the
    shared profile (the same steps, so the same decoded values).
    """
    cachegen = cachegen_for(variant, inputs)
    profile = cachegen.profile if cachegen is not None else None
    codec, stored = codecs_of(variant, cachegen)
    kvs, spec = inputs.contexts(), inputs.spec
    chunks = inputs.store_chunks()
    own = ratio(codec, kvs, spec, STORE_CHUNK) if profile is not None else None
    return VariantResult(
        variant=variant,
        ratio_2048=ratio(codec, kvs, spec, LONG_CHUNK),
        ratio_256=ratio(stored, kvs, spec, STORE_CHUNK),
        ratio_256_own_tables=own,
        quality=quality(inputs.harnesses, roundtrip(stored, spec, STORE_CHUNK)),
        speed=cpu_speed(stored, chunks, spec, inputs.iters, inputs.warmup),
        gpu=gpu_speed(stored, chunks, spec, inputs.iters, inputs.warmup) if gpu else None,
        profile_bytes=len(profile.to_bytes()) if profile is not None else None,
    )
