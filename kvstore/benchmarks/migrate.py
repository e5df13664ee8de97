"""``kvstore bench migrate``: KV transfers between two daemons over shaped, delayed links.

Two ``kvstore serve`` daemons run in separate network namespaces joined by a
veth pair shaped with ``tc tbf`` (``kvstore.benchmarks.netlab``); a relay
inside the receiving node adds the round trip (20 ms by default). Daemon A
holds the chunks and pushes them to daemon B through its admin API; a
transfer's time runs from the request until B has checked and stored every
chunk (B acknowledges a chunk only then). Measured, in one run:

1. At each rate (1 Gbit/s "cross-datacenter", 100 Mbit/s "congested"), for
   the real KV of a 2K-token SmolLM2 prompt (8 chunks of 256 tokens) and
   for 32 MiB Llama-3-8B-geometry chunks: raw transfers against transfers
   whose codec the planner chooses (``codec: auto``) for a deadline of
   ``--speed-deadline-factor`` x the raw bytes' ideal time at that rate.
   ``speedup_<rate>`` is raw time over chosen time (medians).
2. The perplexity delta of what B received at 1 Gbit/s, teacher-forced over
   the prompt's continuation (``kvstore.quality``), against the bfloat16 KV.
3. ``--deadline-transfers`` transfers of the SmolLM2 KV with a deadline of
   ``--deadline-factor`` x the ideal time at the starting rate, the rate
   halved (``tc qdisc change``) during the middle transfer;
   ``deadline_hit_rate`` counts deadlines met.
4. Raw link utilisation: raw bytes / time / shaped rate of the raw transfers.

Both daemons keep a disk tier storing cachegen level 1; for the SmolLM2 KV it
uses a calibrated profile of the model (``migrate_profile``: calibrated once,
10-20 minutes on a CPU, then read from a cache; ``--uncalibrated`` runs without
one, ``--profile-dir`` moves the cache). No profile of that model fits the
Llama-geometry chunks: they move between a second pair of daemons whose tiers
store uncalibrated cachegen.

Needs root for network namespaces; where they are refused the benchmark says
why and stops (exit code 0, ``{"skipped": ...}``). Code: ``migrate_run``
(scenarios and report), ``migrate_lab`` (the daemons), ``migrate_data``
(the payloads).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from kvstore.benchmarks.common import (
    add_common_arguments,
    nonnegative_int,
    positive_float,
    positive_int,
    quick_default,
)
from kvstore.benchmarks.netlab import rate_bps
from kvstore.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class MigrateBenchConfig:
    """One run of the benchmark.

    Attributes:
        rates: shaped rates, the first is the deadline run's starting rate (tc units).
        rtt_ms: round trip added by the relay.
        context_tokens: SmolLM2 prompt tokens moved (whole 256-token chunks).
        continuation_tokens: tokens scored teacher-forced for the perplexity delta.
        llama_chunks: Llama-3-8B-geometry chunks moved per transfer.
        llama_chunk_tokens: tokens per such chunk (256: 32 MiB).
        repeats: timed transfers per (payload, rate, codec); medians are reported.
        speed_deadline_factor: the chosen-codec transfers' deadline, times the raw ideal time.
        deadline_transfers: transfers of the deadline run.
        deadline_factor: their deadline, times the ideal time at the starting rate.
        window: chunks in flight per transfer.
        source_tier_codecs: ``--tier-codecs`` of the sending daemon ("" for none); its chunks are
            written through to the disk tier before the timing starts, so they are held encoded.
        source_disk_bytes: the sending daemon's disk tier (0: none).
        target_tier_codecs: ``--tier-codecs`` of the receiving daemon ("" for none); containers of
            that codec and params are stored as they arrive, without decoding.
        target_disk_bytes: the receiving daemon's disk tier (0: none); it runs write-back, so
            chunks that arrive raw are not encoded for the disk in the background.
        calibrated: the daemons' cachegen tiers (a bare ``cachegen`` in the tier codecs) use a calibrated
            profile of the SmolLM2 model for its KV (``migrate_profile``: built once, then cached); the
            Llama-geometry chunks, which no profile of that model fits, move between daemons without one.
        profile_dir: the profile cache ("" for ``migrate_profile.default_directory()``).
        profile_prompts: calibration prompts of the profile (of ``profile_context`` +
            ``profile_continuation`` tokens, ``profile_draws`` sampled target sets each).
        seed: seed of the prompt draw and of the synthetic chunks.
        show_progress: progress lines on stderr.
    """

    rates: tuple[str, ...] = ("1gbit", "100mbit")
    rtt_ms: float = 20.0
    context_tokens: int = 2048
    continuation_tokens: int = 256
    llama_chunks: int = 4
    llama_chunk_tokens: int = 256
    repeats: int = 3
    speed_deadline_factor: float = 0.25
    deadline_transfers: int = 100
    deadline_factor: float = 1.5
    window: int = 4
    source_tier_codecs: str = "disk=cachegen"
    source_disk_bytes: int = 1 << 30
    target_tier_codecs: str = "disk=cachegen"
    target_disk_bytes: int = 1 << 30
    calibrated: bool = True
    profile_dir: str = ""
    profile_prompts: int = 4
    profile_context: int = 2048
    profile_continuation: int = 256
    profile_draws: int = 2
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.rates:
            raise ValueError("at least one rate")
        for rate in self.rates:
            rate_bps(rate)
        if self.context_tokens < 256 or self.context_tokens % 256:
            raise ValueError("context_tokens must be a positive multiple of 256")
        if self.continuation_tokens < 2:
            raise ValueError("continuation_tokens must be >= 2")
        if self.llama_chunks < 1 or self.llama_chunk_tokens < 1 or self.repeats < 1:
            raise ValueError("llama_chunks, llama_chunk_tokens and repeats must be >= 1")
        if self.deadline_transfers < 0 or not self.deadline_factor > 0 or not self.speed_deadline_factor > 0:
            raise ValueError("deadline_transfers must be >= 0 and the deadline factors > 0")
        if not 1 <= self.window <= 64 or self.rtt_ms < 0:
            raise ValueError("window must be in [1, 64] and rtt_ms >= 0")
        if self.profile_prompts < 1 or self.profile_draws < 1 or self.profile_continuation < 2:
            raise ValueError("the profile needs >= 1 prompt and draw and >= 2 continuation tokens")
        if self.profile_context < 256 or self.profile_context % 256:
            raise ValueError("profile_context must be a positive multiple of 256")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MigrateBenchConfig:
        q = bool(args.quick)
        return cls(
            rates=tuple(args.rates.split(",")),
            rtt_ms=args.rtt_ms,
            context_tokens=quick_default(args.context, 2048, 512, q),
            continuation_tokens=quick_default(args.continuation, 256, 32, q),
            llama_chunks=quick_default(args.llama_chunks, 4, 1, q),
            llama_chunk_tokens=quick_default(args.llama_chunk_tokens, 256, 32, q),
            repeats=quick_default(args.iters, 3, 1, q),
            speed_deadline_factor=args.speed_deadline_factor,
            deadline_transfers=quick_default(args.deadline_transfers, 100, 6, q),
            deadline_factor=args.deadline_factor,
            window=args.window,
            source_tier_codecs=args.source_tier_codecs,
            source_disk_bytes=args.source_disk_bytes,
            target_tier_codecs=args.target_tier_codecs,
            target_disk_bytes=args.target_disk_bytes,
            calibrated=not args.uncalibrated,
            profile_dir=args.profile_dir,
            profile_prompts=1 if q else 4,
            profile_context=512 if q else 2048,
            profile_continuation=32 if q else 256,
            profile_draws=1 if q else 2,
            seed=args.seed,
            show_progress=not args.no_progress,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, iters=3, warmup=1, quick_iters=1, quick_warmup=1)
    parser.add_argument("--rates", default="1gbit,100mbit",
                        help="shaped rates, comma-separated; the first starts the deadline run")  # fmt: skip
    parser.add_argument("--rtt-ms", type=positive_float, default=20.0, help="round trip added (default 20)")
    parser.add_argument("--context", type=positive_int, help="SmolLM2 prompt tokens (default 2048; --quick 512)")
    parser.add_argument("--continuation", type=positive_int,
                        help="tokens scored for the perplexity delta (default 256; --quick 32)")  # fmt: skip
    parser.add_argument("--llama-chunks", type=positive_int, help="Llama-geometry chunks (default 4; --quick 1)")
    parser.add_argument("--llama-chunk-tokens", type=positive_int,
                        help="tokens per Llama-geometry chunk (default 256 = 32 MiB; --quick 32)")  # fmt: skip
    parser.add_argument("--speed-deadline-factor", type=positive_float, default=0.25,
                        help="deadline of the chosen-codec transfers, x the raw ideal time (default 0.25)")
    parser.add_argument("--deadline-transfers", type=nonnegative_int,
                        help="transfers of the deadline run (default 100; --quick 6)")  # fmt: skip
    parser.add_argument("--deadline-factor", type=positive_float, default=1.5,
                        help="their deadline, x the ideal time at the starting rate (default 1.5)")
    parser.add_argument("--window", type=positive_int, default=4, help="chunks in flight (default 4)")
    parser.add_argument("--source-tier-codecs", default="disk=cachegen",
                        help="--tier-codecs of the sending daemon (default disk=cachegen; '' for none)")
    parser.add_argument("--source-disk-bytes", type=nonnegative_int, default=1 << 30,
                        help="disk tier of the sending daemon in bytes (default 1 GiB; 0: none)")
    parser.add_argument("--target-tier-codecs", default="disk=cachegen",
                        help="--tier-codecs of the receiving daemon (default disk=cachegen; '' for none)")
    parser.add_argument("--target-disk-bytes", type=nonnegative_int, default=1 << 30,
                        help="disk tier of the receiving daemon in bytes (default 1 GiB; 0: none)")
    parser.add_argument("--uncalibrated", action="store_true",
                        help="cachegen tiers without a calibrated profile (default: build one per model, "
                             "10-20 minutes once, then cached)")  # fmt: skip
    parser.add_argument("--profile-dir", default="",
                        help="cache of calibrated cachegen profiles (default $KVSTORE_PROFILE_CACHE, "
                             "else ~/.cache/kvstore/cachegen-profiles)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from kvstore.benchmarks.migrate_profile import check_directory, default_directory
    from kvstore.benchmarks.migrate_run import run_config

    try:
        config = MigrateBenchConfig.from_args(args)
        if config.calibrated:
            check_directory(Path(config.profile_dir) if config.profile_dir else default_directory())
    except (ValueError, InvalidInput) as exc:
        print(f"kvstore bench migrate: error: {exc}", file=sys.stderr)
        return 2
    return run_config(config, as_json=bool(args.json))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvstore bench migrate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
