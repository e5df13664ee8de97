"""`kvstore bench codecs`: every codec and level on real SmolLM2-135M KV -- size, speed, quality.

For each registered codec and level (``kvstore.benchmarks.codecs_variants``)
on the KV of real prompts (Python-docs passages and ShareGPT chats,
``kvstore.models.prompts``), stored as bfloat16:

- **size**: bfloat16 bytes over whole container bytes (header, params,
  checksums, scales, tables: all metadata counted) for 256- and 2048-token
  chunks; cachegen's 256-token figure uses a shared per-model profile built
  from other prompts (its bytes are stored once per model and not counted
  per chunk), and is also given with per-chunk tables;
- **speed**: encode and decode of one 256-token chunk at a time on one thread
  (torch and numpy set to one thread, MB/s of bfloat16 bytes per core),
  round-robin with zstd level 1 over the same bytes, the baseline; medians;
- **quality**: teacher-forced continuations after each context
  (``kvstore.quality``), the context's KV passed through the codec 256 tokens
  at a time, against the same KV uncompressed (bfloat16): KL divergence,
  top-1 agreement, perplexity delta, greedy exact-match length; means over
  the prompts.

cachegen runs in its recommended setup (``codecs_variants.cachegen_setup``):
a per-head Fisher-weighted transform calibrated on the calibration prompts
(never the scored ones), keys un-rotated with the model's RoPE base, the
profile's tables at 256 tokens and inline tables with the same steps at 2048;
``--uncalibrated`` measures the plain levels (no transform, keys as they are).

The defaults (6 prompts, 2048 context tokens, 256 continuation tokens) are the
sizes ``kvstore.quality`` recommends for reported numbers; ``--quick`` is a
tiny run for tests. ``--device cuda`` runs the model on the GPU and also
times cachegen's CUDA path (``cachegen_gpu.py``); it fails at once where no
CUDA device is usable.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Literal

from kvstore.benchmarks.common import add_common_arguments, finish, positive_int, quick_default

Device = Literal["cpu", "cuda"]
MAX_POSITIONS = 8192


@dataclass(frozen=True, slots=True)
class CodecsBenchConfig:
    """One run of the benchmark.

    Invariants (checked at construction, ``ValueError`` otherwise):
    ``prompts >= 1`` (the first half passages, the rest chats); ``context >= 256`` (one
    full store chunk); ``continuation >= 2``; the longest sequence fits the
    model's 8192 positions; ``iters >= 1``, ``warmup >= 0``; ``device`` is cpu or cuda.
    """

    prompts: int = 6
    context: int = 2048
    continuation: int = 256
    greedy_tokens: int = 32
    calibration_prompts: int = 4
    iters: int = 15
    warmup: int = 2
    device: Device = "cpu"
    seed: int = 0
    only: tuple[str, ...] | None = None
    show_progress: bool = True
    calibrated: bool = True

    def __post_init__(self) -> None:
        if self.prompts < 1 or self.calibration_prompts < 1:
            raise ValueError("--prompts and --calibration-prompts must be >= 1")
        if self.context < 256 or self.continuation < 2 or self.greedy_tokens < 0:
            raise ValueError("--context must be >= 256 (one store chunk), --continuation >= 2")
        if self.context + max(self.continuation, self.greedy_tokens + 1) > MAX_POSITIONS:
            raise ValueError(f"context + continuation exceed the model's {MAX_POSITIONS} positions")
        if self.iters < 1 or self.warmup < 0:
            raise ValueError("--iters must be >= 1 and --warmup >= 0")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")

    @property
    def recommended(self) -> bool:
        """Whether the sizes are those recommended for reported numbers (2048 + 256 tokens)."""
        return self.context >= 2048 and self.continuation >= 256

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CodecsBenchConfig:
        """The config the parsed flags describe (``--quick`` picks small defaults).

        Raises:
            ValueError: an invalid combination (see the class invariants).
        """
        q = bool(args.quick)
        only = tuple(k.strip() for k in args.only.split(",") if k.strip()) if args.only else None
        return cls(
            prompts=quick_default(args.prompts, 6, 1, q),
            context=quick_default(args.context, 2048, 256, q),
            continuation=quick_default(args.continuation, 256, 16, q),
            greedy_tokens=quick_default(args.greedy_tokens, 32, 2, q),
            calibration_prompts=quick_default(args.calibration_prompts, 4, 1, q),
            iters=quick_default(args.iters, 15, 3, q),
            warmup=quick_default(args.warmup, 2, 0, q),
            device=args.device,
            seed=args.seed,
            only=only,
            show_progress=not args.no_progress,
            calibrated=not args.uncalibrated,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``kvstore bench codecs`` to ``parser``."""
    add_common_arguments(parser, iters=15, warmup=2, quick_iters=3, quick_warmup=0)
    add = parser.add_argument
    add(
        "--prompts",
        type=positive_int,
        help="prompts measured, half docs passages, half chats (default 6; --quick 1)",
    )
    add("--context", type=positive_int, help="context tokens per prompt (default 2048; --quick 256)")
    add("--continuation", type=positive_int, help="scored continuation tokens (default 256; --quick 16)")
    add("--greedy-tokens", type=int, help="length of the greedy exact-match probe (default 32; --quick 2)")
    add(
        "--calibration-prompts",
        type=positive_int,
        help="other prompts cachegen's transform and profiles are built from (default 4; --quick 1)",
    )
    add(
        "--uncalibrated",
        action="store_true",
        help="cachegen without the calibrated transform or key un-rotation (the plain levels)",
    )
    add("--device", choices=("cpu", "cuda"), default="cpu", help="where the model and GPU codec paths run")
    add("--only", help="comma-separated variant keys to measure (default: all), e.g. int8,cachegen_l1")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed flags describe; print lines, a table and (--json) JSON.

    Returns:
        0; errors propagate as exceptions (the CLI prints ``KVStoreError`` / ``ValueError``).
    """
    from kvstore.benchmarks.codecs_run import bench_codecs

    finish(bench_codecs(CodecsBenchConfig.from_args(args)), bool(args.json))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m kvstore.benchmarks.codecs [flags]``: the same as ``kvstore bench codecs``."""
    parser = argparse.ArgumentParser(
        prog="kvstore bench codecs", description=(__doc__ or "").split("\n\n")[0]
    )
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except ValueError as exc:  # KVStoreError input errors are ValueErrors too
        print(f"kvstore bench codecs: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
