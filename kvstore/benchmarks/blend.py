"""`kvstore bench blend`: CacheBlend-style passage reuse against full prefill, on the real model.

A RAG workload from real text: a pool of Python-docs passages, each prompt a
chat-formatted request over ``--passages`` of them (seeded choice and order,
so passages recur at different positions) and an uncached tail of ~64 tokens:
a fixed instruction and a real FAQ question (``question_tokens``: the median). Every
passage's KV is computed once on its own and kept in a TieredStore under its
content key. For each recompute ratio r in {0, 0.05, 0.15, 0.3, 1.0} the
benchmark blends each prompt and compares it with a full prefill of the same
prompt measured in the same run:

==========================  =====================================================
figure                      how
==========================  =====================================================
KL, top-1 agreement         next-token distributions over the prompt's last
                            token and ``--answer-tokens`` teacher-forced tokens
                            of the FAQ answer (decoded from the blended cache),
                            pooled over the prompts; ``top1_min_rX`` /
                            ``top1_max_rX``: the spread of the per-prompt top-1
``kl_ratio_rX``             KL at r over KL at r = 0 (full reuse, the floor)
TTFT, ``ttft_speedup_rX``   full prefill time / (store fetch + blend) time,
                            medians, interleaved round by round
==========================  =====================================================
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from kvstore.benchmarks.common import Report, add_common_arguments, finish, positive_int, quick_default, say
from kvstore.errors import InvalidInput

RATIOS = (0.0, 0.05, 0.15, 0.3, 1.0)


def ratio_suffix(ratio: float) -> str:
    """JSON key suffix of a ratio: 0 -> r0, 0.05 -> r005, 0.15 -> r015, 0.3 -> r03, 1.0 -> r1."""
    return "r" + format(ratio, "g").replace(".", "")


@dataclass(frozen=True, slots=True)
class BlendBenchConfig:
    """One run of the benchmark.

    Attributes:
        prompts: RAG prompts measured.
        passages: passages per prompt.
        pool: distinct passages the prompts draw from (< prompts * passages, so they recur).
        passage_tokens: tokens per passage (256-512 for the workload).
        answer_tokens: teacher-forced answer tokens per prompt (quality).
        iters, warmup: timed and untimed TTFT rounds per prompt.
        ratios: recompute ratios measured (must include 0, the quality floor).
        threads: torch threads.
        seed: picks passages, questions and orders.
    """

    prompts: int
    passages: int
    pool: int
    passage_tokens: int
    answer_tokens: int
    iters: int
    warmup: int
    ratios: tuple[float, ...] = RATIOS
    threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if 0.0 not in self.ratios:
            raise InvalidInput("the ratios must include 0 (full reuse, the quality floor)")
        if self.pool < self.passages:
            raise InvalidInput(f"a pool of {self.pool} passages cannot fill prompts of {self.passages}")
        if self.answer_tokens < 1:
            raise InvalidInput("answer_tokens must be >= 1")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BlendBenchConfig:
        q = bool(args.quick)
        passages = quick_default(args.passages, 6, 4, q)
        return cls(
            prompts=quick_default(args.prompts, 8, 2, q),
            passages=passages,
            pool=quick_default(args.pool, passages + 2, passages + 1, q),
            passage_tokens=quick_default(args.passage_tokens, 512, 256, q),
            answer_tokens=quick_default(args.answer_tokens, 64, 64, q),
            iters=quick_default(args.iters, 1, 1, q),
            warmup=quick_default(args.warmup, 0, 0, q),
            threads=args.threads,
            seed=args.seed,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``kvstore bench blend``."""
    add_common_arguments(parser, iters=1, warmup=0, quick_iters=1, quick_warmup=0)
    parser.add_argument("--prompts", type=positive_int, help="RAG prompts (default 8; --quick 2)")
    parser.add_argument("--passages", type=positive_int, help="passages per prompt (default 6; --quick 4)")
    parser.add_argument("--pool", type=positive_int, help="distinct passages drawn from (default passages+2)")
    parser.add_argument("--passage-tokens", type=positive_int, help="tokens per passage (default 512; --quick 256)")
    parser.add_argument("--answer-tokens", type=positive_int, help="teacher-forced answer tokens (default 64)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")


def run_config(cfg: BlendBenchConfig) -> Report:
    """Measure every ratio on every prompt (torch and the model are imported only here)."""
    from kvstore.benchmarks.blend_run import measure
    from kvstore.models.smollm2 import load_smollm2, torch_threads

    report = Report()
    with torch_threads(cfg.threads):
        say("loading SmolLM2-135M-Instruct")
        lm = load_smollm2("float32")
        measure(lm, cfg, report)
    return report


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the flags describe; 0 on success."""
    finish(run_config(BlendBenchConfig.from_args(args)), bool(args.json))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvstore bench blend", description=(__doc__ or "").split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
