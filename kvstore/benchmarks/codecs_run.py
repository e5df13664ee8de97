"""One run of `kvstore bench codecs`: load the model, build the prompts, measure, report.

The measurements are in ``kvstore.benchmarks.codecs_measure``; this module
owns the order of the work, the one-thread setting and the report: JSON keys
``<variant>_<figure>`` for every variant (``int8_ratio``, ``cachegen_l2_top1``
...), the codec's own name for its default level (``cachegen_ratio_256``),
and a table.
"""

from __future__ import annotations

import importlib.util
import statistics
from collections.abc import Sequence

import torch

from kvstore.benchmarks import codecs_measure as m
from kvstore.benchmarks.codecs import CodecsBenchConfig
from kvstore.benchmarks.codecs_variants import CALIBRATION_DRAWS, Variant, cachegen_setup, select, variants
from kvstore.benchmarks.common import Report, progress, say
from kvstore.codecs.cachegen_bench import prefill_kv, prompt_ids
from kvstore.errors import InvalidInput
from kvstore.models import LoadedModel, load_smollm2, torch_threads

HEADERS = (
    "codec / level", "x@2048", "x@256", "KL", "top-1", "ppl delta", "greedy",
    "enc MB/s", "dec MB/s", "enc/zstd1", "dec/zstd1", "json key",
)  # fmt: skip


def check_device(device: str) -> None:
    """Refuse ``cuda`` where torch sees no CUDA device or CuPy is missing (before any work).

    Raises:
        InvalidInput: ``device`` is ``cuda`` and CUDA or CuPy is not usable.
    """
    if device != "cuda":
        return
    if not torch.cuda.is_available():
        raise InvalidInput(
            f"--device cuda: CUDA is not available (torch {torch.__version__} sees no CUDA device); "
            "run with --device cpu, or on a machine with a GPU, a CUDA build of torch and CuPy"
        )
    if importlib.util.find_spec("cupy") is None:
        raise InvalidInput("--device cuda: cachegen's GPU path needs CuPy (pip install 'kvstore[gpu]')")


def bench_codecs(config: CodecsBenchConfig) -> Report:
    """Measure every selected variant; returns the report (table rows, notes, JSON values).

    Raises:
        InvalidInput: ``--device cuda`` without CUDA, or the model is not installed.
        ValueError: an unknown variant key in ``config.only``.
    """
    check_device(config.device)
    todo = select(variants(), list(config.only) if config.only else None)
    with torch_threads(1):
        inputs = build_inputs(load_smollm2("bfloat16"), config, todo)
        results = []
        with progress(len(todo), "bench codecs", config.show_progress) as bar:
            for variant in todo:
                bar.set_postfix_str(variant.key)
                results.append(m.measure_variant(variant, inputs, gpu=config.device == "cuda"))
                say(line(results[-1]))
                bar.update(1)
        fp32, ppl_reference = m.float32_quality(inputs.harnesses)
        zstd = (m.zstd_ratio(inputs.contexts(), m.LONG_CHUNK), m.zstd_ratio(inputs.contexts(), m.STORE_CHUNK))
    return build_report(config, results, fp32, ppl_reference, zstd, inputs.cachegen.rope_theta)


def build_inputs(loaded: LoadedModel, config: CodecsBenchConfig, todo: Sequence[Variant]) -> m.Inputs:
    """The measured prompts' harnesses, the calibration prompts' KV and cachegen's setup, from one
    draw of prompts.

    ``prompt_ids`` returns its passages, then its chats; each half is split
    between the measured prompts and the calibration prompts, so that neither
    the transform nor the profiles see a measured prompt and ShareGPT is
    read once. Calibration (context + continuation of each calibration
    prompt) and the calibration KV are computed on the CPU; with ``--device
    cuda`` the model then moves to the GPU for the harnesses.
    """
    p, c = config.prompts, config.calibration_prompts
    ids = prompt_ids(loaded, p + c, config.context + config.continuation, seed=config.seed + 1)
    measured, calibration = split_prompts(ids, p, c, config.context + config.continuation)
    if config.calibrated and any(v.profile for v in todo):
        say(f"calibrating cachegen on {len(calibration)} prompt(s), {CALIBRATION_DRAWS} draws each")
    pairs = [(x[: config.context], x[config.context :]) for x in calibration]
    setup = cachegen_setup(loaded, pairs, calibrated=config.calibrated and any(v.profile for v in todo))
    kvs = [prefill_kv(loaded, x[: config.context]) for x in calibration]
    if config.device == "cuda":
        torch.nn.Module.to(loaded.model, "cuda")  # in place
    harnesses = [
        m.StoredKVHarness(
            loaded, x[: config.context], x[config.context :], greedy_tokens=config.greedy_tokens
        )
        for x in measured
    ]
    return m.Inputs(loaded.spec_for("bfloat16"), harnesses, kvs, config.iters, config.warmup, setup)


def split_prompts(
    ids: Sequence[Sequence[int]], p: int, c: int, tokens: int = 0
) -> tuple[list[list[int]], list[list[int]]]:
    """(``p`` measured, up to ``c`` calibration) prompts from ``prompt_ids``'s ``p + c`` of ``tokens``
    tokens (its passages, then its chats): each half shared between the two, no prompt in both.

    Raises:
        InvalidInput: fewer than ``p`` measured or no calibration prompts, or a calibration prompt
            that is also a measured one (calibration must be held out).
    """
    n_docs = (p + c) - (p + c) // 2
    docs, chats = [list(x) for x in ids[:n_docs]], [list(x) for x in ids[n_docs:]]
    measured = docs[: p - p // 2] + chats[: p // 2]
    calibration = (docs[p - p // 2 :] + chats[p // 2 :])[:c]
    if len(measured) < p or not calibration:
        raise InvalidInput(f"could not draw {p} + {c} prompts of {tokens} tokens")
    if {tuple(x) for x in measured} & {tuple(x) for x in calibration}:
        raise InvalidInput("a calibration prompt is also a measured one: calibration must be held out")
    return measured, calibration


def _g(x: float) -> float:
    """Six significant digits for JSON (0.0 and 1.0 stay exact)."""
    return float(f"{x:.6g}")


def record(report: Report, r: m.VariantResult) -> None:
    """Every figure of ``r`` under its key prefix, and under the codec's name for its default level."""
    for p in [r.variant.key] + ([r.variant.alias] if r.variant.alias else []):
        values: dict[str, float | None] = {
            "ratio": r.ratio_256,
            "ratio_256": r.ratio_256,
            "ratio_2048": r.ratio_2048,
            "ratio_256_own_tables": r.ratio_256_own_tables,
            "kl": r.quality.kl,
            "top1": r.quality.top1,
            "ppl_delta": r.quality.ppl_delta,
            "greedy_match": r.quality.greedy_match,
            "cpu_encode_mbps": r.speed.encode_mbps,
            "cpu_decode_mbps": r.speed.decode_mbps,
            "encode_vs_zstd1": r.speed.encode_vs_zstd,
            "decode_vs_zstd1": r.speed.decode_vs_zstd,
        }
        if r.gpu is not None:
            values.update(gpu_encode_mbps=r.gpu.encode_mbps, gpu_decode_mbps=r.gpu.decode_mbps)
        for name, value in values.items():
            if value is not None:
                report.record(f"{p}_{name}", _g(value))
        if r.profile_bytes is not None:
            report.record(f"{p}_profile_bytes", r.profile_bytes)


def line(r: m.VariantResult) -> str:
    """One progress line per measured variant."""
    q, s = r.quality, r.speed
    own = f" (own tables x{r.ratio_256_own_tables:.2f})" if r.ratio_256_own_tables else ""
    return (
        f"{r.variant.label:<46} x{r.ratio_2048:.2f} @2048, x{r.ratio_256:.2f} @256{own}; "
        f"KL {q.kl:.4g} top-1 {q.top1:.4f} dppl {q.ppl_delta:+.4g}; "
        f"enc {s.encode_mbps:.0f} dec {s.decode_mbps:.0f} MB/s"
    )


def row(report: Report, r: m.VariantResult) -> None:
    q, s = r.quality, r.speed
    at256 = f"{r.ratio_256:.2f}" + (f" (own {r.ratio_256_own_tables:.2f})" if r.ratio_256_own_tables else "")
    report.row(
        r.variant.label, f"{r.ratio_2048:.2f}", at256, f"{q.kl:.3g}", f"{q.top1:.2%}", f"{q.ppl_delta:+.3g}",
        f"{q.greedy_match:.1f}", f"{s.encode_mbps:.0f}", f"{s.decode_mbps:.0f}",
        f"{s.encode_vs_zstd:.2f}x", f"{s.decode_vs_zstd:.2f}x", f"{r.variant.key}_*",
    )  # fmt: skip


def build_report(
    config: CodecsBenchConfig,
    results: Sequence[m.VariantResult],
    fp32: m.Quality,
    ppl_reference: float,
    zstd: tuple[float, float],
    rope_theta: float = 0.0,
) -> Report:
    """The table (zstd-1 and float32 rows first), the notes and every JSON value."""
    report = Report(headers=HEADERS)
    _record_run(report, config, fp32, ppl_reference)
    report.record("cachegen_rope_theta", rope_theta)
    zstd_enc = statistics.median(r.speed.zstd_encode_mbps for r in results)
    zstd_dec = statistics.median(r.speed.zstd_decode_mbps for r in results)
    for name, value in (("ratio_2048", zstd[0]), ("ratio_256", zstd[1])):
        report.record(f"zstd1_{name}", _g(value))
    report.record("zstd1_cpu_encode_mbps", _g(zstd_enc))
    report.record("zstd1_cpu_decode_mbps", _g(zstd_dec))
    report.row("zstd -1 on the bf16 bytes (baseline)", f"{zstd[0]:.2f}", f"{zstd[1]:.2f}", "-", "-", "-", "-",
               f"{zstd_enc:.0f}", f"{zstd_dec:.0f}", "1.00x", "1.00x", "zstd1_*")  # fmt: skip
    report.row("float32 KV (before bf16 rounding)", "0.50", "0.50", f"{fp32.kl:.3g}", f"{fp32.top1:.2%}",
               f"{fp32.ppl_delta:+.3g}", f"{fp32.greedy_match:.1f}", "-", "-", "-", "-", "fp32_*")  # fmt: skip
    for r in results:
        record(report, r)
        row(report, r)
    for text in notes(config, results):
        report.note(text)
    return report


def _record_run(report: Report, config: CodecsBenchConfig, fp32: m.Quality, ppl_reference: float) -> None:
    for key, value in (
        ("prompts", config.prompts), ("context_tokens", config.context),
        ("continuation_tokens", config.continuation), ("greedy_tokens", config.greedy_tokens),
        ("calibration_prompts", config.calibration_prompts), ("chunk_tokens", m.STORE_CHUNK),
        ("cachegen_calibrated", config.calibrated),
        ("calibration_draws", CALIBRATION_DRAWS if config.calibrated else 0),
        ("iters", config.iters), ("warmup", config.warmup), ("threads", 1), ("device", config.device),
        ("reference", "bfloat16 KV"), ("recommended_sizes", config.recommended),
    ):  # fmt: skip
        report.record(key, value)
    report.record("ppl_reference", _g(ppl_reference))
    report.record("fp32_kl", _g(fp32.kl))
    report.record("fp32_top1", _g(fp32.top1))
    report.record("fp32_ppl_delta", _g(fp32.ppl_delta))
    default = next((v for v in variants() if v.alias == "cachegen"), None)
    if default is not None:
        report.record("cachegen_default_level", default.level)


def notes(config: CodecsBenchConfig, results: Sequence[m.VariantResult]) -> list[str]:
    """What the table's columns mean, and the caveats of this run."""
    size = (
        f"size: bf16 bytes / container bytes (all metadata); x@2048 uses chunks of "
        f"min(2048, {config.context}) tokens; zstd -1 compresses the plain bytes (no container)"
    )
    quality = (
        f"quality: mean over {config.prompts} prompts of {config.context} context + {config.continuation} "
        "teacher-forced tokens; KV through the codec 256 tokens at a time, against the same KV in bf16"
    )
    speed = (
        f"speed: median of {config.iters} rounds, one 256-token chunk per call, one thread "
        "(MB/s of bf16), round-robin with zstd -1 on the same chunk"
    )
    out = [size, quality, speed]
    sizes = sorted({r.profile_bytes for r in results if r.profile_bytes is not None})
    if sizes:
        setup = (
            f"calibrated: per-head Fisher-weighted transform from the same {config.calibration_prompts} "
            f"prompt(s) ({CALIBRATION_DRAWS} draws), keys un-rotated; x@2048 and 'own' with the same steps"
            if config.calibrated
            else "uncalibrated: the plain levels, keys as they are"
        )
        out.append(
            f"cachegen x@256 (and its speed, quality) with a shared per-model profile from "
            f"{config.calibration_prompts} other prompts ({sizes[0]:,}-{sizes[-1]:,} bytes per level, stored "
            f"once per model, not counted per chunk); 'own' = each chunk carries its own tables; {setup}"
        )
    if config.device == "cuda":
        out.append("gpu: only cachegen has a CUDA path (keys *_gpu_*_mbps); other codecs ran on the CPU")
    if not config.recommended:
        out.append("context/continuation below 2048/256 tokens: a smoke run, not numbers to report")
    return out
