"""`kvstore bench gpu`: the GPU path against ceilings measured in the same run.

Ceilings first: a device-to-device ``copy_`` of ``--ceiling-mib`` MiB
(``d2d``) and host<->device copies of one ``--chunk-mib`` MiB chunk between
page-locked host memory and the device (``pinned_h2d``, ``pinned_d2h``).
Then each figure as a ratio of throughputs (1.0 = as fast as the ceiling):

==============================  ==============================================
key                             what
==============================  ==============================================
``tier_h2d_vs_pinned``          GPUTier.put of a chunk from pageable host memory
                                (through the pinned staging slots) / pinned_h2d
``tier_d2h_vs_pinned``          GPUTier.get_into pageable host memory / pinned_d2h
``tier_h2d_direct_vs_pinned``   put from pinned host memory (no staging) / pinned_h2d
``tier_d2h_direct_vs_pinned``   get into pinned host memory / pinned_d2h
``paged_vs_d2d``                the slower of the paged gather and scatter kernels
                                (SmolLM2 geometry, vLLM flash NHD pages, shuffled
                                blocks) / d2d, bytes of the chunk
``rope_vs_d2d``                 RoPE shift of the K of one chunk in place / d2d
``gather_vs_d2d``               selective token gather (``--keep`` of the tokens) / d2d,
                                bytes gathered
``cachegen_encode_gbps``        GpuCoder.encode of a bf16 chunk in device memory, GB/s
                                of input (container download included)
``cachegen_decode_gbps``        GpuCoder.decode_into device memory, GB/s of bf16 output
==============================  ==============================================

Timed with ``torch.cuda.synchronize()`` inside each operation (wall clock,
medians over ``--iters`` interleaved rounds). The kernel figures need CuPy
(``pip install 'kvstore[gpu]'``); without it they are skipped with a note and
recorded as null. Without CUDA the command exits 2 with one line.

    kvstore bench gpu [--json] [--quick] [--chunk-mib N] [--tokens N] ...
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from kvstore.benchmarks.common import (
    Report,
    add_common_arguments,
    finish,
    positive_float,
    positive_int,
    quick_default,
    say,
)
from kvstore.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class GpuBenchConfig:
    """One run of the benchmark.

    Attributes:
        chunk_mib: size of a tier chunk and of the pinned copies (32 MiB: the issue's figure).
        ceiling_mib: size of the device-to-device copy that sets the d2d ceiling.
        tokens: tokens of the paged, RoPE and cachegen chunks (SmolLM2-135M geometry:
            30 layers, 3 kv heads, head dim 64, bf16).
        keep: fraction of tokens the selective gather keeps.
        iters, warmup: timed and untimed rounds per measurement.
        seed: seed of the random data.
    """

    chunk_mib: int
    ceiling_mib: int
    tokens: int
    keep: float
    iters: int
    warmup: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise InvalidInput(f"--keep must be in (0, 1], got {self.keep}")
        if self.chunk_mib < 1 or self.ceiling_mib < 1 or self.tokens < 16:
            raise InvalidInput("--chunk-mib and --ceiling-mib must be >= 1, --tokens >= 16")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> GpuBenchConfig:
        q = bool(args.quick)
        return cls(
            chunk_mib=quick_default(args.chunk_mib, 32, 32, q),
            ceiling_mib=quick_default(args.ceiling_mib, 256, 64, q),
            tokens=quick_default(args.tokens, 2048, 512, q),
            keep=args.keep,
            iters=quick_default(args.iters, 20, 5, q),
            warmup=quick_default(args.warmup, 3, 1, q),
            seed=args.seed,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``kvstore bench gpu``."""
    add_common_arguments(parser, iters=20, warmup=3, quick_iters=5, quick_warmup=1)
    parser.add_argument("--chunk-mib", type=positive_int, help="tier chunk size in MiB (default 32)")
    parser.add_argument(
        "--ceiling-mib", type=positive_int, help="d2d ceiling copy in MiB (default 256; --quick 64)"
    )
    parser.add_argument("--tokens", type=positive_int, help="tokens per KV chunk (default 2048; --quick 512)")
    parser.add_argument(
        "--keep", type=positive_float, default=0.3, help="fraction of tokens gathered (default 0.3)"
    )


def check_cuda() -> None:
    """Refuse before any work where torch sees no CUDA device.

    Raises:
        InvalidInput: CUDA is not available (one line, printed by the CLI; exit status 2).
    """
    try:
        import torch
    except ImportError:
        raise InvalidInput("CUDA is not available: torch is not installed") from None
    if not torch.cuda.is_available():
        raise InvalidInput(
            f"CUDA is not available (torch {torch.__version__} sees no CUDA device); "
            "kvstore bench gpu needs a GPU, a CUDA build of torch and CuPy"
        )


def run_config(cfg: GpuBenchConfig) -> Report:
    """Every measurement, ceilings first (torch, CuPy and the kernels are imported only here)."""
    check_cuda()
    from kvstore.benchmarks import gpu_kernels, gpu_measure

    report = Report()
    for line in gpu_measure.versions():
        say(line)
        report.note(line)
    ceilings = gpu_measure.ceilings(cfg, report)
    gpu_measure.tier_transfers(cfg, ceilings, report)
    if gpu_kernels.cupy_ready(report):
        gpu_kernels.paged(cfg, ceilings, report)
        gpu_kernels.blend(cfg, ceilings, report)
        gpu_kernels.cachegen(cfg, report)
    else:
        for key in (
            "paged_vs_d2d",
            "rope_vs_d2d",
            "gather_vs_d2d",
            "cachegen_encode_gbps",
            "cachegen_decode_gbps",
        ):
            report.record(key, None)
    return report


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the flags describe; 0 on success."""
    finish(run_config(GpuBenchConfig.from_args(args)), bool(args.json))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvstore bench gpu", description=(__doc__ or "").split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
