"""`kvstore bench ttft`: time to first token with kvstore against full prefill, on the real model.

SmolLM2-135M-Instruct (float32 compute, torch on ``--threads`` threads,
default 1), KV kept in the model's compute dtype (exact reuse), through the
HuggingFace connector. Every figure has its baseline measured in the same run:

=================================  ==================================================
kvstore                            baseline measured in the same run
=================================  ==================================================
TTFT, context cached in the CPU    full prefill of the same prompt (N context tokens
tier / the disk tier / a daemon    + a 16-token suffix), interleaved round by round
over TCP, N = 512, 1024, 2048
ShareGPT multi-turn replay         the same prompts prefilled without kvstore
paged gather/scatter vs memcpy     memcpy of the same bytes, paired round by round
                                   (``kvstore.benchmarks.paged.measure_paged``)
=================================  ==================================================

Speedups are baseline time / kvstore time (higher is better). See
kvstore/benchmarks/ttft_prefill.py and ttft_replay.py for what exactly is timed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass

from kvstore.benchmarks.common import (
    Report,
    add_common_arguments,
    finish,
    positive_int,
    quick_default,
    say,
)
from kvstore.errors import InvalidInput
from kvstore.keys import Namespace
from kvstore.spec import DType

SOURCES = ("cpu", "disk", "daemon")
SECTIONS = (*SOURCES, "sharegpt", "paged")
FULL_CONTEXTS = (512, 1024, 2048)
QUICK_CONTEXTS = (256, 512)


@dataclass(frozen=True, slots=True)
class PrefillSetup:
    """What the TTFT section measures.

    Attributes:
        contexts: cached context lengths (multiples of ``ns.chunk_tokens``).
        suffix: tokens after the context that every request computes.
        sources: which of SOURCES to measure.
        iters, warmup: timed and untimed rounds.
    """

    contexts: tuple[int, ...]
    suffix: int
    sources: tuple[str, ...]
    iters: int
    warmup: int


@dataclass(frozen=True, slots=True)
class ReplaySetup:
    """The replay's size.

    Attributes:
        conversations: ShareGPT conversations (with at least two user messages).
        max_turns: user messages replayed per conversation, at most.
        reply_tokens: cap on each greedy reply.
        max_user_tokens: each user message is cut to this many tokens.
        max_context: a conversation ends before a turn whose prompt plus reply could exceed this.
        seed: picks the conversations.
    """

    conversations: int
    max_turns: int
    reply_tokens: int
    max_user_tokens: int
    max_context: int
    seed: int


@dataclass(frozen=True, slots=True)
class TTFTBenchConfig:
    """One run of the benchmark.

    Attributes:
        prefill: the TTFT section (contexts, suffix, sources, rounds).
        replay: the ShareGPT section.
        chunk_tokens: tokens per chunk.
        kv_dtype: dtype the KV is stored in (float32 = the compute dtype: reuse is exact).
        threads: torch threads in this process.
        skip: sections (of SECTIONS) not to run.
        quick: passed on to the paged measurement.
    """

    prefill: PrefillSetup
    replay: ReplaySetup
    chunk_tokens: int = 64
    kv_dtype: DType = "float32"
    threads: int = 1
    skip: frozenset[str] = frozenset()
    quick: bool = False

    def __post_init__(self) -> None:
        if unknown := self.skip - set(SECTIONS):
            raise InvalidInput(f"unknown sections {sorted(unknown)}; known: {SECTIONS}")
        if bad := [n for n in self.prefill.contexts if n % self.chunk_tokens]:
            raise InvalidInput(f"contexts {bad} are not multiples of the chunk size {self.chunk_tokens}")
        if not 1 <= self.prefill.suffix < self.chunk_tokens:
            raise InvalidInput(f"the suffix must be 1 .. {self.chunk_tokens - 1} tokens (less than a chunk)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TTFTBenchConfig:
        q = bool(args.quick)
        skip = frozenset(args.skip or ())
        contexts = tuple(args.contexts) if args.contexts else (QUICK_CONTEXTS if q else FULL_CONTEXTS)
        prefill = PrefillSetup(
            contexts=contexts,
            suffix=args.suffix,
            sources=tuple(s for s in SOURCES if s not in skip),
            iters=quick_default(args.iters, 5, 1, q),
            warmup=quick_default(args.warmup, 1, 0, q),
        )
        replay = ReplaySetup(
            conversations=quick_default(args.conversations, 4, 1, q),
            max_turns=quick_default(args.max_turns, 4, 2, q),
            reply_tokens=quick_default(args.reply_tokens, 128, 8, q),
            max_user_tokens=quick_default(args.max_user_tokens, 512, 128, q),
            max_context=args.max_context,
            seed=args.seed,
        )
        return cls(prefill, replay, args.chunk_tokens, args.kv_dtype, args.threads, skip, q)


def _contexts(text: str) -> list[int]:
    return [positive_int(part) for part in text.split(",") if part]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``kvstore bench ttft``."""
    add_common_arguments(parser, iters=5, warmup=1, quick_iters=1, quick_warmup=0)
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1, comparable runs)")
    parser.add_argument("--contexts", type=_contexts, help="cached context lengths (default 512,1024,2048; "
                        "--quick 256,512)")
    parser.add_argument("--suffix", type=positive_int, default=16, help="tokens after the context (default 16)")
    parser.add_argument("--chunk-tokens", type=positive_int, default=64, help="tokens per chunk (default 64)")
    parser.add_argument("--kv-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype the KV is stored in (default float32, the compute dtype)")
    parser.add_argument("--conversations", type=positive_int, help="ShareGPT conversations (default 4; --quick 1)")
    parser.add_argument("--max-turns", type=positive_int, help="user messages per conversation (default 4; --quick 2)")
    parser.add_argument("--reply-tokens", type=positive_int, help="cap on each reply (default 128; --quick 8)")
    parser.add_argument("--max-user-tokens", type=positive_int,
                        help="each user message is cut to this many tokens (default 512; --quick 128)")
    parser.add_argument("--max-context", type=positive_int, default=2048,
                        help="a conversation ends before its context would exceed this (default 2048)")
    parser.add_argument("--skip", action="append", choices=SECTIONS, help="leave a section out (repeatable)")


def measure_paged_ratio(report: Report, quick: bool) -> None:
    """``paged_vs_memcpy`` from :func:`kvstore.benchmarks.paged.measure_paged`, on one torch thread.

    The paired measurement (memcpy of the same bytes timed around each gather
    and scatter, ratio taken per round, median reported); ``quick`` takes
    fewer rounds of the same 2048-token transfer.
    """
    from kvstore.benchmarks.paged import measure_paged

    rounds = 7 if quick else 21
    result = measure_paged(threads=1, iters=rounds, warmup=1 if quick else 2)
    value = result["paged_vs_memcpy"]
    report.record("paged_vs_memcpy", round(value, 3))
    for key in ("paged_gather_vs_memcpy", "paged_scatter_vs_memcpy", "memcpy_mbps"):
        report.record(key, result[key])
    baseline = f"memcpy {result['memcpy_mbps'] / 1e3:.2f} GB/s"
    report.row("paged gather/scatter vs memcpy", f"{value:.2f}x", baseline, f"{value:.2f}x", "paged_vs_memcpy")


def run_config(cfg: TTFTBenchConfig) -> Report:
    """Run every section ``cfg`` asks for (torch and the model are imported only here)."""
    from kvstore.benchmarks.ttft_prefill import measure_ttft
    from kvstore.benchmarks.ttft_replay import replay_sharegpt
    from kvstore.models.smollm2 import load_smollm2, torch_threads

    report = Report()
    with torch_threads(cfg.threads):
        say("loading SmolLM2-135M-Instruct")
        lm = load_smollm2(cfg.kv_dtype)
        ns = Namespace("kvstore-bench-ttft", lm.spec, chunk_tokens=cfg.chunk_tokens)
        for key, value in (("model", lm.fingerprint.name), ("kv_dtype", cfg.kv_dtype),
                           ("chunk_tokens", cfg.chunk_tokens), ("suffix_tokens", cfg.prefill.suffix),
                           ("threads", cfg.threads), ("iters", cfg.prefill.iters)):
            report.record(key, value)
        if cfg.prefill.sources:
            workdir = tempfile.mkdtemp(prefix="kvsb-ttft-")
            try:
                measure_ttft(lm, ns, cfg.prefill, report, workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        if "sharegpt" not in cfg.skip:
            replay_sharegpt(lm, ns, cfg.replay, report)
    if "paged" not in cfg.skip:
        measure_paged_ratio(report, cfg.quick)
    report.note(f"prompts: N cached context tokens + {cfg.prefill.suffix} computed; KV stored as {cfg.kv_dtype}, "
                f"{cfg.chunk_tokens}-token chunks; torch on {cfg.threads} thread(s); medians of {cfg.prefill.iters}")
    return report


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the flags describe; 0 on success."""
    report = run_config(TTFTBenchConfig.from_args(args))
    finish(report, bool(args.json))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvstore bench ttft", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
