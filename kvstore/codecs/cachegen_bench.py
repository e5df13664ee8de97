"""Measure cachegen on real SmolLM2-135M KV: size ratio, quality and CPU throughput.

``python3 -m kvstore.codecs.cachegen_bench [--prompts 4] [--levels 0,1,2,3] [--no-transform] [--uncalibrated] [--json]``

Prompts: Python-docs passages and ShareGPT chats (``kvstore.models.prompts``)
of ``context + continuation`` tokens (seed 1); the profile and the calibration
(``cachegen_calibrate``: per-head statistics for a transform by default, the
per-channel sensitivity with ``--no-transform``) use other prompts (seed 2)
than the ones measured. Ratios are against the chunk stored as
bfloat16; quality (``kvstore.quality``) is against the model's own float32 KV,
next to the plain bfloat16 round trip as the baseline of the same run.
Throughput is single-threaded (the C coder never spawns threads), best of a
few runs, in MB/s of bfloat16 chunk bytes.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvstore.buffers import U8
from kvstore.codecs.base import ChunkLayout, Codec, CodecParams
from kvstore.codecs.cachegen import CachegenCodec
from kvstore.codecs.cachegen_calibrate import calibrate, calibrate_heads, rope_theta_of
from kvstore.codecs.cachegen_params import F64, CachegenParams
from kvstore.codecs.cachegen_profile import CachegenProfile, build_profile
from kvstore.codecs.cachegen_transform import HeadTransform, build_transform
from kvstore.models.kv import cache_to_chunk
from kvstore.models.prompts import chat_token_ids, sample_conversations, sample_passages
from kvstore.models.smollm2 import LoadedModel, load_smollm2
from kvstore.quality import KVTransform, QualityHarness, QualityReport
from kvstore.spec import KVSpec


@dataclass(frozen=True, slots=True)
class LevelResult:
    """One level's numbers, averaged over the prompts."""

    level: int
    ratio_2048: float
    ratio_256: float
    ratio_256_profile: float
    kl_mean: float
    top1: float
    ppl_delta: float
    greedy_match: float
    encode_mbps: float
    decode_mbps: float


def prompt_ids(loaded: LoadedModel, count: int, tokens: int, seed: int) -> list[list[int]]:
    """``count`` prompts of ``tokens`` tokens: half docs passages, half ShareGPT chats (joined)."""
    passages = sample_passages(loaded.tokenizer, tokens=tokens, count=count - count // 2, seed=seed)
    docs = [list(p.token_ids) for p in passages]
    chats: list[list[int]] = []
    pool = sample_conversations(200, seed=seed)
    ids: list[int] = []
    for conv in pool:
        ids += chat_token_ids(loaded.tokenizer, conv.turns)
        if len(ids) >= tokens:
            chats.append(ids[:tokens])
            ids = []
            if len(chats) == count // 2:
                break
    return docs + chats


def prefill_kv(loaded: LoadedModel, ids: Sequence[int]) -> torch.Tensor:
    """The float32 chunk-layout KV of ``ids``."""
    with torch.inference_mode():
        out = loaded.model(input_ids=torch.tensor([list(ids)]), use_cache=True, logits_to_keep=1)
    return cache_to_chunk(out.past_key_values, dtype=torch.float32)


def to_chunks(kv: torch.Tensor, chunk_tokens: int) -> list[U8]:
    """bfloat16 chunk bytes of a ``[layers, 2, tokens, heads, dim]`` KV, ``chunk_tokens`` at a time."""
    bf = kv.to(torch.bfloat16)
    return [
        bf[:, :, t : t + chunk_tokens].contiguous().view(torch.uint8).numpy().reshape(-1)
        for t in range(0, kv.shape[2], chunk_tokens)
    ]


def roundtrip(codec: Codec, spec: KVSpec, chunk_tokens: int) -> KVTransform:
    """A KV transform: bfloat16, encode and decode ``chunk_tokens`` at a time, back to float32."""

    def transform(kv: torch.Tensor) -> torch.Tensor:
        parts = []
        for raw in to_chunks(kv, chunk_tokens):
            layout = ChunkLayout(spec, raw.size // spec.bytes_per_token)
            out = np.empty(layout.nbytes, np.uint8)
            codec.decode_into(codec.encode(raw, layout), out)
            parts.append(torch.from_numpy(out).view(torch.bfloat16).reshape(layout.shape).float())
        return torch.cat(parts, dim=2)

    return transform


def ratio(codec: Codec, kvs: Sequence[torch.Tensor], spec: KVSpec, chunk_tokens: int) -> float:
    """bfloat16 bytes over whole container bytes (header, params, checksums included)."""
    raw_bytes = coded = 0
    for kv in kvs:
        for raw in to_chunks(kv, chunk_tokens):
            raw_bytes += raw.size
            coded += len(codec.encode(raw, ChunkLayout(spec, raw.size // spec.bytes_per_token)))
    return raw_bytes / coded


def throughput(codec: CachegenCodec, raw: U8, layout: ChunkLayout, repeat: int = 5) -> tuple[float, float]:
    """(encode, decode) MB/s of chunk bytes, best of ``repeat``, one thread."""
    enc = dec = float("inf")
    out = np.empty(layout.nbytes, np.uint8)
    for _ in range(repeat):
        t0 = time.perf_counter()
        blob = codec.encode(raw, layout)
        t1 = time.perf_counter()
        codec.decode_into(blob, out)
        t2 = time.perf_counter()
        enc, dec = min(enc, t1 - t0), min(dec, t2 - t1)
    return layout.nbytes / enc / 1e6, layout.nbytes / dec / 1e6


def make_profile(
    kvs: Sequence[torch.Tensor],
    spec: KVSpec,
    level: int,
    sensitivity: F64 | None = None,
    rope_theta: float = 0.0,
    transform: HeadTransform | None = None,
) -> CachegenProfile:
    """A profile for ``level`` from 256-token chunks of ``kvs`` (with ``sensitivity``: calibrated steps;
    with ``rope_theta``: for codecs that un-rotate keys; with ``transform``: per-head transform coding)."""
    params = CachegenParams(level=level, rope_theta=rope_theta)
    chunks = [raw for kv in kvs for raw in to_chunks(kv, 256)]
    samples = [(raw, ChunkLayout(spec, raw.size // spec.bytes_per_token)) for raw in chunks]
    return build_profile(samples, params, sensitivity=sensitivity, transform=transform)


def calibration_prompts(
    loaded: LoadedModel, count: int, context: int, continuation: int, seed: int = 2
) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs for :func:`calibrate` and the profile (never the measured prompts)."""
    return [(ids[:context], ids[context:]) for ids in prompt_ids(loaded, count, context + continuation, seed)]


def mean_report(reports: Sequence[QualityReport]) -> dict[str, float]:
    return {
        "kl_mean": float(np.mean([r.kl_mean for r in reports])),
        "top1": float(np.mean([r.top1_agreement for r in reports])),
        "ppl_delta": float(np.mean([r.ppl_delta for r in reports])),
        "greedy_match": float(np.mean([r.greedy_match for r in reports])),
    }


def measure_level(
    level: int,
    harnesses: Sequence[QualityHarness],
    calib: Sequence[torch.Tensor],
    spec: KVSpec,
    sensitivity: F64 | None = None,
    rope_theta: float = 0.0,
    transform: HeadTransform | None = None,
) -> LevelResult:
    """One level's sizes, quality and speed; with a ``sensitivity`` or a ``transform`` every figure uses
    calibrated steps (``ratio_2048``, ``ratio_256``: inline tables only; ``ratio_256_profile``: the
    profile's tables)."""
    profile = make_profile(calib, spec, level, sensitivity, rope_theta, transform)
    base: CodecParams = {"level": level, "rope_theta": rope_theta, "profile": profile.digest}
    with_profile = CachegenCodec(base, profiles=[profile])
    if sensitivity is None and transform is None:
        codec = CachegenCodec({"level": level, "rope_theta": rope_theta})
    else:
        codec = CachegenCodec({**base, "profile_tables": False}, profiles=[profile])
    kvs = [h.reference_kv for h in harnesses]
    q = mean_report([h.evaluate(roundtrip(codec, spec, 2048)) for h in harnesses])
    raw = to_chunks(kvs[0], 2048)[0]
    enc, dec = throughput(codec, raw, ChunkLayout(spec, raw.size // spec.bytes_per_token))
    return LevelResult(
        level,
        ratio(codec, kvs, spec, 2048),
        ratio(codec, kvs, spec, 256),
        ratio(with_profile, kvs, spec, 256),
        q["kl_mean"],
        q["top1"],
        q["ppl_delta"],
        q["greedy_match"],
        enc,
        dec,
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--levels", default="0,1,2,3")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--calibration", type=int, default=4, help="prompts of the profile and sensitivity")
    ap.add_argument("--draws", type=int, default=2, help="sampled target sets per calibration prompt")
    ap.add_argument("--uncalibrated", action="store_true", help="steps relative to each slab's spread")
    ap.add_argument(
        "--no-transform",
        action="store_true",
        help="per-channel calibrated steps instead of per-head transforms",
    )
    ap.add_argument("--no-rope", action="store_true", help="code keys as they are (rope_theta 0)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    loaded = load_smollm2("bfloat16", num_threads=2)
    spec = loaded.spec_for("bfloat16")
    total = args.context + args.continuation
    harnesses = [
        QualityHarness(loaded, ids[: args.context], ids[args.context :])
        for ids in prompt_ids(loaded, args.prompts, total, seed=1)
    ]
    pairs = calibration_prompts(loaded, args.calibration, args.context, args.continuation)
    theta = 0.0 if args.no_rope else rope_theta_of(loaded)
    sensitivity = transform = None
    if not args.uncalibrated and args.no_transform:
        sensitivity = calibrate(loaded, pairs, draws=args.draws)
    elif not args.uncalibrated:
        transform = build_transform(calibrate_heads(loaded, pairs, draws=args.draws, rope_theta=theta))
    calib = [prefill_kv(loaded, context) for context, _ in pairs]
    base = mean_report([h.evaluate(lambda kv: kv.to(torch.bfloat16).float()) for h in harnesses])
    levels = [int(lv) for lv in args.levels.split(",")]
    results = [measure_level(lv, harnesses, calib, spec, sensitivity, theta, transform) for lv in levels]
    setup = {"calibrated": not args.uncalibrated, "transform": transform is not None, "rope_theta": theta}
    if args.json:
        print(json.dumps({"bf16": base, **setup, "levels": [_asdict(r) for r in results]}))
        return 0
    print(f"bf16 baseline: {base}; {setup}")
    for r in results:
        print(
            f"level {r.level}: x{r.ratio_2048:.2f} @2048, x{r.ratio_256:.2f} @256, "
            f"x{r.ratio_256_profile:.2f} @256+profile; KL {r.kl_mean:.4f} top-1 {r.top1:.3f} "
            f"dppl {r.ppl_delta:+.3f} greedy {r.greedy_match:.1f}; "
            f"enc {r.encode_mbps:.0f} MB/s dec {r.decode_mbps:.0f} MB/s"
        )
    return 0


def _asdict(r: LevelResult) -> dict[str, float]:
    return {k: float(getattr(r, k)) for k in LevelResult.__slots__}


if __name__ == "__main__":
    raise SystemExit(main())
