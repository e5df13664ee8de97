"""The scenarios of ``kvstore bench migrate`` and its report (see ``kvstore.benchmarks.migrate``)."""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvstore.benchmarks.common import Report, finish, say
from kvstore.benchmarks.migrate import MigrateBenchConfig
from kvstore.benchmarks.migrate_data import CHUNK_TOKENS, Payload, chunks_to_kv, kv_chunks, llama_payload
from kvstore.benchmarks.migrate_lab import Pair, ServeOptions, TransferResult
from kvstore.benchmarks.migrate_profile import (
    CachedProfile,
    ProfileSettings,
    cached_profile,
    calibrate_smollm2,
    default_directory,
    with_profile,
)
from kvstore.benchmarks.netlab import NetLab, rate_bps, unavailable_reason
from kvstore.keys import Namespace, prefix_keys
from kvstore.quality import QualityReport
from kvstore.service.migration.planner import CodecOption
from kvstore.service.migration.transfer_codecs import DEFAULT_CACHEGEN_LEVEL, ladder, measure

if TYPE_CHECKING:
    from kvstore.benchmarks.codecs_measure import StoredKVHarness

HEADERS = ("payload", "rate", "raw", "chosen", "codecs chosen", "sent/raw", "speedup", "raw link use")


@dataclass(frozen=True, slots=True)
class Comparison:
    """Raw against chosen-codec transfers of one payload at one rate (medians of the repeats)."""

    payload: str
    rate: str
    raw: list[TransferResult]
    chosen: list[TransferResult]
    setup_s: float
    nbytes: int

    @property
    def raw_s(self) -> float:
        return statistics.median(r.elapsed_s for r in self.raw)

    @property
    def chosen_s(self) -> float:
        return statistics.median(r.elapsed_s for r in self.chosen)

    @property
    def speedup(self) -> float:
        return self.raw_s / self.chosen_s

    @property
    def utilisation(self) -> float:
        return self.nbytes * 8 / self.raw_s / rate_bps(self.rate)

    @property
    def sent_ratio(self) -> float:
        return statistics.median(r.bytes_sent / max(r.bytes_raw, 1) for r in self.chosen)

    def codecs(self) -> str:
        counts: dict[str, int] = {}
        for r in self.chosen:
            for name, n in r.codecs.items():
                counts[name] = counts.get(name, 0) + n
        return " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))


@dataclass(frozen=True, slots=True)
class SmolKV:
    """The SmolLM2 payload, the harness that scores what arrives, and the prompt (context + continuation)."""

    payload: Payload
    harness: StoredKVHarness
    prompt: tuple[int, ...]


def smollm_payload(config: MigrateBenchConfig) -> SmolKV:
    """Prefill a real prompt with SmolLM2 (bfloat16 reference KV) and cut it into 256-token chunks."""
    from kvstore.benchmarks.codecs_measure import StoredKVHarness
    from kvstore.codecs.cachegen_bench import prompt_ids
    from kvstore.models import load_smollm2, torch_threads

    total = config.context_tokens + config.continuation_tokens
    with torch_threads(2):
        loaded = load_smollm2("bfloat16")
        ids = prompt_ids(loaded, 1, total, seed=config.seed + 1)[0]
        ctx, cont = ids[: config.context_tokens], ids[config.context_tokens :]
        harness = StoredKVHarness(loaded, ctx, cont, greedy_tokens=0)
    ns = Namespace("bench", loaded.spec_for("bfloat16"), chunk_tokens=CHUNK_TOKENS)
    chunks = tuple(kv_chunks(harness.reference_kv, CHUNK_TOKENS))
    return SmolKV(Payload("smollm2-2k", ns, tuple(prefix_keys(ns, ctx)), chunks), harness, tuple(ids))


def smollm_profile(config: MigrateBenchConfig, smol: SmolKV) -> CachedProfile | None:
    """The calibrated cachegen profile of the SmolLM2 model from the cache, calibrated (and cached) if missing;
    None when ``config.calibrated`` is off. The measured prompt is held out of the calibration."""
    if not config.calibrated:
        return None
    settings = ProfileSettings.for_spec(
        smol.payload.ns.spec, held_out=[smol.prompt], level=DEFAULT_CACHEGEN_LEVEL, prompts=config.profile_prompts,
        context_tokens=config.profile_context, continuation_tokens=config.profile_continuation,
        draws=config.profile_draws)  # fmt: skip
    directory = Path(config.profile_dir) if config.profile_dir else default_directory()
    return cached_profile(directory, settings, calibrate_smollm2(settings, [smol.prompt], directory), say)


def received_quality(pair: Pair, smol: SmolKV) -> QualityReport:
    """Read the chunks back from B and score them against the bfloat16 KV."""
    from kvstore.models import torch_threads

    p = smol.payload
    outs = [c.copy() for c in p.chunks]
    with pair.b.client() as kv:
        kv.register(p.ns)
        sizes = kv.get_many(p.ns, list(p.keys), outs)
    if any(s is None for s in sizes):
        raise RuntimeError("the receiving daemon lost chunks before they could be scored")
    with torch_threads(2):
        return smol.harness.evaluate_kv(chunks_to_kv(outs, p.ns.spec))


def store_on_source(pair: Pair, payloads: Sequence[Payload], lower_tiers: bool, timeout_s: float = 300.0) -> None:
    """Store every payload on A; with ``lower_tiers``, wait until A's lower tiers hold them too."""
    with pair.a.client() as kv:
        for p in payloads:
            kv.register(p.ns)
            for key, chunk in zip(p.keys, p.chunks):
                if not kv.put(p.ns, key, chunk):
                    raise RuntimeError(f"daemon A refused a chunk of {p.name}")
    want, end = sum(len(p.keys) for p in payloads), time.monotonic() + timeout_s
    while lower_tiers:
        tiers = pair.a.admin("GET", "/v1/stats")["tiers"]
        if all(int(t["entries"]) >= want for t in tiers[1:]):
            return
        if time.monotonic() > end:
            raise RuntimeError(f"daemon A's lower tiers did not take the chunks in {timeout_s} s: {tiers}")
        time.sleep(0.2)


def coder_speeds(p: Payload, config: MigrateBenchConfig, cached: CachedProfile | None) -> list[CodecOption]:
    """What the sending daemon measures before an auto push: every ladder codec on one chunk, here
    (with its cachegen tier's params, the profile included)."""
    held = config.source_disk_bytes and "cachegen" in config.source_tier_codecs
    params = (cached.codec_params() if cached is not None else {"level": DEFAULT_CACHEGEN_LEVEL}) if held else None
    return measure(ladder(params), p.chunks[0], p.ns)


def compare(pair: Pair, p: Payload, rate: str, config: MigrateBenchConfig) -> Comparison:
    """Warm up (codec measurement, link estimate), then raw and chosen transfers, alternating."""
    ideal = p.nbytes * 8 / rate_bps(rate)
    deadline = config.speed_deadline_factor * ideal
    for codec in ("raw", "auto"):  # untimed: the first auto push measures the codecs on a chunk
        pair.clear_target(p.ns, p.keys)
        pair.transfer(p.ns, p.keys, codec, deadline if codec == "auto" else None, config.window)
    raw, chosen = [], []
    for _ in range(config.repeats):
        pair.clear_target(p.ns, p.keys)
        raw.append(_checked(pair.transfer(p.ns, p.keys, "raw", None, config.window)))
        pair.clear_target(p.ns, p.keys)
        chosen.append(_checked(pair.transfer(p.ns, p.keys, "auto", deadline, config.window)))
    setup = pair.transfer(p.ns, p.keys, "raw", None, config.window).elapsed_s  # B holds all: HAVE skips them
    out = Comparison(p.name, rate, raw, chosen, setup, p.nbytes)
    say(f"{p.name:<22} {rate:>8}: raw {out.raw_s:.3f} s, chosen {out.chosen_s:.3f} s ({out.codecs()}), "
        f"speedup {out.speedup:.2f}x, raw link use {out.utilisation:.0%}, setup {setup * 1e3:.0f} ms")  # fmt: skip
    return out


def _checked(r: TransferResult) -> TransferResult:
    if r.state != "done":
        raise RuntimeError(f"a transfer ended {r.state}: {r.error}")
    return r


@dataclass(frozen=True, slots=True)
class DeadlineRun:
    deadline_s: float
    results: list[TransferResult]
    halved_at: int

    @property
    def hit_rate(self) -> float:
        return self.rate_of(0, len(self.results))

    def rate_of(self, start: int, stop: int) -> float:
        part = self.results[start:stop]
        return sum(bool(r.deadline_met) for r in part) / max(len(part), 1)


def deadline_run(pair: Pair, lab: NetLab, p: Payload, config: MigrateBenchConfig) -> DeadlineRun:
    """``deadline_transfers`` auto transfers; the rate halves during the middle one."""
    start = config.rates[0]
    half = f"{rate_bps(start) / 2 / 1e6:g}mbit"
    lab.set_rate(start)
    deadline = config.deadline_factor * p.nbytes * 8 / rate_bps(start)
    for codec in ("raw", "auto"):  # untimed: the link estimate (kept per peer) moves to this rate
        pair.clear_target(p.ns, p.keys)
        pair.transfer(p.ns, p.keys, codec, deadline if codec == "auto" else None, config.window)
    results, middle = [], config.deadline_transfers // 2
    for i in range(config.deadline_transfers):
        pair.clear_target(p.ns, p.keys)
        if i == middle:
            threading.Timer(min(0.1, deadline / 4), lab.set_rate, (half,)).start()
        results.append(_checked(pair.transfer(p.ns, p.keys, "auto", deadline, config.window)))
    time.sleep(0.2)
    lab.set_rate(start)
    run = DeadlineRun(deadline, results, middle)
    say(f"deadline run: {sum(bool(r.deadline_met) for r in results)}/{len(results)} met {deadline:.3f} s "
        f"({start}, halved to {half} during transfer {middle})")  # fmt: skip
    return run


def bench_migrate(config: MigrateBenchConfig, workdir: Path) -> Report:
    """The whole benchmark; raises RuntimeError where the lab or a daemon fails.

    The SmolLM2 KV moves between daemons whose cachegen tiers use the model's calibrated profile
    (when ``config.calibrated``); the Llama-geometry chunks, which no profile of that model fits,
    between a second pair started after the first stopped, with uncalibrated tiers.
    """
    load_before = os.getloadavg()
    say("prefilling the SmolLM2 prompt")
    smol = smollm_payload(config)
    llama = llama_payload(config.llama_chunks, config.llama_chunk_tokens, config.seed)
    cached = smollm_profile(config, smol)
    room = smol.payload.nbytes + llama.nbytes
    cpu, largest = 2 * room + (256 << 20), max(64 << 20, 2 * llama.chunks[0].size)
    plain = serve_options(config, cpu, largest, None)
    calibrated = serve_options(config, cpu, largest, cached)
    speeds = coder_speeds(smol.payload, config, cached)
    comparisons: list[Comparison] = []
    quality: dict[str, QualityReport] = {}
    with NetLab(("a", "b"), rate=config.rates[0]) as lab:
        pair = Pair(lab, workdir / "smollm2", *calibrated, config.rtt_ms).start()
        try:
            store_on_source(pair, [smol.payload], lower_tiers=bool(config.source_disk_bytes))
            for rate in config.rates:
                lab.set_rate(rate)
                comparisons.append(compare(pair, smol.payload, rate, config))
                quality[rate] = received_quality(pair, smol)
                say(f"quality of what arrived at {rate}: {quality[rate].summary()}")
            deadlines = deadline_run(pair, lab, smol.payload, config) if config.deadline_transfers else None
        finally:
            pair.stop()
        pair = Pair(lab, workdir / "llama", *plain, config.rtt_ms).start(pair.peer_url)
        try:
            store_on_source(pair, [llama], lower_tiers=bool(config.source_disk_bytes))
            for rate in config.rates:
                lab.set_rate(rate)
                comparisons.append(compare(pair, llama, rate, config))
        finally:
            pair.stop()
    return build_report(config, comparisons, quality, deadlines, speeds, load_before, cached)


def serve_options(config: MigrateBenchConfig, cpu: int, largest: int,
                  cached: CachedProfile | None) -> tuple[ServeOptions, ServeOptions]:  # fmt: skip
    """(the sender's, the receiver's) daemon settings; cachegen tiers with ``cached``'s profile if given."""
    source_codecs = with_profile(config.source_tier_codecs, cached) if config.source_disk_bytes else ""
    target_codecs = with_profile(config.target_tier_codecs, cached) if config.target_disk_bytes else ""
    source = ServeOptions(cpu, config.source_disk_bytes, source_codecs, largest)
    target = ServeOptions(cpu, config.target_disk_bytes, target_codecs, largest,
                          "write_back" if config.target_disk_bytes else "")  # fmt: skip
    return source, target


def build_report(config: MigrateBenchConfig, comparisons: Sequence[Comparison], quality: dict[str, QualityReport],
                 deadlines: DeadlineRun | None, speeds: Sequence[CodecOption],
                 load_before: tuple[float, float, float], cached: CachedProfile | None = None) -> Report:
    report = Report(headers=HEADERS)
    report.record("cachegen_profile", cached.profile.digest if cached is not None else "none")
    if cached is not None:
        report.record("cachegen_profile_built", cached.built)
        report.record("cachegen_profile_build_s", round(cached.build_s, 1))
        report.note(f"SmolLM2 KV: cachegen tiers with the calibrated profile {cached.profile.digest} "
                    f"({'calibrated in this run' if cached.built else 'from the cache'}, {cached.directory}); "
                    "Llama chunks: a second pair of daemons, uncalibrated cachegen")  # fmt: skip
    else:
        report.note("cachegen tiers without a calibrated profile (--uncalibrated)")
    for c in comparisons:
        report.row(c.payload, c.rate, f"{c.raw_s:.3f} s", f"{c.chosen_s:.3f} s", c.codecs(), f"{c.sent_ratio:.2f}",
                   f"{c.speedup:.2f}x", f"{c.utilisation:.0%}")  # fmt: skip
        tag = _tag(c.rate) if c.payload.startswith("smollm2") else f"llama_{_tag(c.rate)}"
        report.record(f"speedup_{tag}", round(c.speedup, 3))
        report.record(f"raw_s_{tag}", round(c.raw_s, 4))
        report.record(f"chosen_s_{tag}", round(c.chosen_s, 4))
        report.record(f"chosen_codecs_{tag}", c.codecs())
        report.record(f"sent_over_raw_{tag}", round(c.sent_ratio, 4))
        report.record(f"raw_link_utilisation_{tag}", round(c.utilisation, 4))
        report.record(f"setup_ms_{tag}", round(c.setup_s * 1e3, 2))
    llama = [c for c in comparisons if not c.payload.startswith("smollm2")]
    report.record("raw_link_utilisation", round(min(c.utilisation for c in llama or comparisons), 4))
    for rate, q in quality.items():
        report.record(f"ppl_delta_{_tag(rate)}", round(q.ppl_delta, 5))
        report.record(f"top1_{_tag(rate)}", round(q.top1_agreement, 5))
        report.record(f"kl_{_tag(rate)}", round(q.kl_mean, 6))
    for o in speeds:
        label = o.label.replace("-", "")
        report.record(f"coder_{label}_ratio", round(o.ratio, 3))
        report.record(f"coder_{label}_encode_mbps", round(o.encode_bytes_per_s / 1e6, 1))
        report.record(f"coder_{label}_decode_mbps", round(o.decode_bytes_per_s / 1e6, 1))
    if deadlines is not None:
        report.record("deadline_hit_rate", round(deadlines.hit_rate, 4))
        report.record("deadline_hit_rate_before_halving", round(deadlines.rate_of(0, deadlines.halved_at), 4))
        report.record("deadline_hit_rate_after_halving",
                      round(deadlines.rate_of(deadlines.halved_at, len(deadlines.results)), 4))  # fmt: skip
        report.record("deadline_transfers", len(deadlines.results))
        report.record("deadline_s", round(deadlines.deadline_s, 4))
        report.record("deadline_elapsed_p50_s", round(statistics.median(r.elapsed_s for r in deadlines.results), 4))
        report.record("deadline_elapsed_max_s", round(max(r.elapsed_s for r in deadlines.results), 4))
        report.record("deadline_codecs", _codec_mix(deadlines.results))
    report.record("rtt_ms", config.rtt_ms)
    report.record("context_tokens", config.context_tokens)
    report.record("continuation_tokens", config.continuation_tokens)
    report.record("llama_chunk_bytes", config.llama_chunk_tokens * 128 * 1024)
    report.record("load_average_before", round(load_before[0], 2))
    report.record("load_average_after", round(os.getloadavg()[0], 2))
    report.note("times: from the admin request on the sender until the receiver acknowledged (checked and "
                "stored) every chunk; medians of the repeats; setup = a transfer the receiver already holds")
    report.note(f"chosen: codec auto with a deadline of {config.speed_deadline_factor} x the raw ideal time")
    report.note(f"sender tiers: {config.source_tier_codecs or 'raw'} (chunks written through before timing); "
                f"receiver tiers: {config.target_tier_codecs or 'raw'} (write-back; matching containers stored "
                "as they arrive, decoded on read)")
    for rate, q in quality.items():
        report.note(f"received SmolLM2 KV at {rate}: {q.summary()}")
    report.note("coders on one SmolLM2 chunk, one thread, this machine: " + "; ".join(
        f"{o.label} x{o.ratio:.2f} enc {o.encode_bytes_per_s / 1e6:.0f} dec {o.decode_bytes_per_s / 1e6:.0f} MB/s"
        for o in speeds if o.codec != "raw"))
    if deadlines is not None:
        report.note(f"deadline run: {deadlines.hit_rate:.0%} of {len(deadlines.results)} met "
                    f"{deadlines.deadline_s:.3f} s; codecs {_codec_mix(deadlines.results)}")  # fmt: skip
    return report


def _codec_mix(results: Sequence[TransferResult]) -> str:
    counts: dict[str, int] = {}
    for r in results:
        for name, n in r.codecs.items():
            counts[name] = counts.get(name, 0) + n
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))


def _tag(rate: str) -> str:
    return rate.strip().lower()


def run_config(config: MigrateBenchConfig, as_json: bool) -> int:
    """Run, print the table (and the JSON line); 0, also when namespaces are refused (reported as skipped)."""
    reason = unavailable_reason()
    if reason is not None:
        report = Report(headers=HEADERS)
        report.record("skipped", f"network namespaces unavailable: {reason}")
        report.note(f"skipped: {reason} (kvstore bench migrate needs root for ip netns and tc)")
        finish(report, as_json)
        return 0
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="kvbench-migrate-") as tmp:
        report = bench_migrate(config, Path(tmp))
    finish(report, as_json)
    return 0
