"""Paged KV gather and scatter against a plain copy of the same bytes, in one run.

One request's tokens (default 2048, SmolLM2-135M's geometry: 30 layers, 3 kv
heads, head dim 64, bf16) sit in a vLLM FlashAttention cache (NHD, blocks of
16) in shuffled blocks. Timed after a warm-up, in paired rounds:

- ``gather``: ``kvstore.connectors.paged.gather`` into a preallocated chunk
  (slot checks included);
- ``scatter``: ``kvstore.connectors.paged.scatter`` of a chunk into the pages
  (slot checks included);
- ``memcpy``: ``Tensor.copy_`` of a chunk-sized tensor into another, the
  fastest way to move those bytes at all.

A round is ``memcpy, gather, memcpy, scatter, memcpy`` (gather and scatter
swap places every other round); each operation's ratio in a round is the mean
of the two memcpy times around it over its own time, so a burst of background
load hits both sides of the ratio. Ratios are throughput over memcpy's (higher
is better, 1.0 = as fast as a plain copy): the median over ``--iters`` rounds;
``paged_vs_memcpy`` is the lower of the gather and scatter medians. Torch
runs on ``--threads`` threads (default 1: on a small shared machine one thread
is the steadiest; the copy gets the same).

    python -m kvstore.benchmarks.paged [--json] [--quick] [--tokens N] [--layout NAME] ...
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvstore.benchmarks.common import (
    Report,
    Timing,
    add_common_arguments,
    finish,
    format_rate,
    format_ratio,
    gc_paused,
    percentile,
    positive_int,
    quick_default,
    say,
)
from kvstore.connectors.paged import PagedKVCache, gather, scatter
from kvstore.connectors.paged_layouts import get_layout, layout_names
from kvstore.models import torch_threads

__all__ = [
    "PagedBenchConfig",
    "PairedTimings",
    "add_arguments",
    "bench_paged",
    "main",
    "measure_paged",
    "measure_paired",
    "run",
]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True, slots=True)
class PagedBenchConfig:
    """What to measure; the defaults are SmolLM2-135M in bf16 with vLLM's blocks of 16."""

    num_layers: int = 30
    num_kv_heads: int = 3
    head_dim: int = 64
    dtype: str = "bfloat16"
    block_size: int = 16
    num_tokens: int = 2048
    #: blocks in the cache (default: 4x the blocks the tokens use, so the used ones are scattered)
    num_blocks: int | None = None
    layout: str = "vllm_flash_nhd"
    iters: int = 15
    warmup: int = 2
    seed: int = 0
    #: torch threads while timing (None: leave torch's setting alone)
    threads: int | None = 1

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "num_tokens", "iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}")
        if get_layout(self.layout).all_layers or get_layout(self.layout).is_mla:
            raise ValueError("the benchmark takes a per-layer K/V layout (vllm_flash_*, flashinfer_*)")

    @property
    def blocks_used(self) -> int:
        return -(-self.num_tokens // self.block_size)


def _pages(c: PagedBenchConfig, gen: torch.Generator) -> list[torch.Tensor]:
    blocks = c.num_blocks or 4 * c.blocks_used
    order = {"kv": 2, "block": blocks, "token": c.block_size, "head": c.num_kv_heads, "dim": c.head_dim}
    shape = tuple(order[a] for a in get_layout(c.layout).axes)
    dtype = _DTYPES[c.dtype]
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(c.num_layers)]


@dataclass(frozen=True, slots=True)
class PairedTimings:
    """Times of each operation and of its baseline, and the ratio of every round (baseline time / op time)."""

    timings: dict[str, Timing]
    ratios: dict[str, tuple[float, ...]]

    def ratio(self, name: str) -> float:
        """Median over the rounds of ``name``'s ratio (throughput over the baseline's)."""
        return percentile(self.ratios[name], 50.0)


def measure_paired(
    ops: dict[str, Callable[[], object]], baseline: Callable[[], object], *, iters: int, warmup: int
) -> PairedTimings:
    """Time each op between two runs of ``baseline``, round after round; ratios are taken per round.

    A round runs ``baseline, op1, baseline, op2, ..., baseline``, the ops in
    reverse order every other round; an op's ratio is the mean of the two
    baseline times around it over its time. The first ``warmup`` rounds are
    discarded; the garbage collector is paused while timing.

    Raises:
        ValueError: ``iters`` < 1, ``warmup`` < 0 or no ops.
    """
    if iters < 1 or warmup < 0 or not ops:
        raise ValueError("need iters >= 1, warmup >= 0 and at least one op")
    clock = time.perf_counter
    names = list(ops)
    samples: dict[str, list[float]] = {name: [] for name in [*names, "memcpy"]}
    ratios: dict[str, list[float]] = {name: [] for name in names}

    def timed(op: Callable[[], object]) -> float:
        t0 = clock()
        op()
        return clock() - t0

    with gc_paused():
        for i in range(warmup + iters):
            order = names if i % 2 == 0 else names[::-1]
            before = timed(baseline)
            for name in order:
                took = timed(ops[name])
                after = timed(baseline)
                if i >= warmup:
                    samples[name].append(took)
                    samples["memcpy"].append(after)
                    ratios[name].append((before + after) / 2 / took)
                before = after
    return PairedTimings(
        {name: Timing(tuple(s)) for name, s in samples.items()},
        {name: tuple(r) for name, r in ratios.items()},
    )


def bench_paged(c: PagedBenchConfig) -> Report:
    """Measure gather and scatter against memcpy in paired rounds; returns the report (lines printed as measured)."""
    gen = torch.Generator().manual_seed(c.seed)
    cache = PagedKVCache.wrap(_pages(c, gen), c.layout)
    if cache.geometry.num_blocks < c.blocks_used:
        raise ValueError(f"{c.num_blocks} blocks cannot hold {c.num_tokens} tokens")
    table = torch.randperm(cache.geometry.num_blocks, generator=gen)[: c.blocks_used]
    slots = cache.block_table_slots(table, 0, c.num_tokens)
    shape = cache.geometry.chunk_shape(c.num_tokens)
    chunk = torch.randn(shape, generator=gen).to(cache.dtype)
    out, dst = torch.empty_like(chunk), torch.empty_like(chunk)
    ops: dict[str, Callable[[], object]] = {
        "paged_gather": lambda: gather(cache, slots, out),
        "paged_scatter": lambda: scatter(cache, slots, chunk),
    }
    nbytes = chunk.numel() * chunk.element_size()
    report = Report()
    report.record("paged_bytes", nbytes)
    report.record("paged_tokens", c.num_tokens)
    report.record("paged_threads", torch.get_num_threads())
    report.record("paged_rounds", c.iters)
    say(
        f"{c.layout}: {c.num_tokens} tokens in {c.blocks_used} shuffled blocks, {nbytes / 1e6:.1f} MB a chunk"
    )
    paired = measure_paired(ops, lambda: dst.copy_(chunk), iters=c.iters, warmup=c.warmup)
    memcpy_rate = report.throughput("memcpy", paired.timings["memcpy"], nbytes)
    ratios = []
    for name, label in (("paged_gather", "gather (pages -> chunk)"), ("paged_scatter", "scatter (chunk -> pages)")):
        rate = report.throughput(name, paired.timings[name], nbytes)
        ratio = paired.ratio(name)
        low = percentile(paired.ratios[name], 25.0)
        report.record(f"{name}_vs_memcpy", round(ratio, 3))
        report.record(f"{name}_vs_memcpy_p25", round(low, 3))
        report.row(label, format_rate(rate), f"memcpy {format_rate(memcpy_rate)}", format_ratio(ratio),
                   f"{name}_vs_memcpy")
        say(f"{label:<40} {format_rate(rate):>12}   vs memcpy {format_rate(memcpy_rate):<23} "
            f"{format_ratio(ratio)} (per-round median; 25th percentile {format_ratio(low)})")
        ratios.append(round(ratio, 3))
    report.record("paged_vs_memcpy", min(ratios))
    gather(cache, slots, out)  # the last round may have gathered before it scattered
    if not torch.equal(out.view(torch.uint8), chunk.view(torch.uint8)):
        raise AssertionError("gather did not return the scattered chunk")  # the timed work was real
    return report


def measure_paged(**options: object) -> dict[str, float]:
    """Run the benchmark (keyword arguments are :class:`PagedBenchConfig` fields); returns its figures.

    Keys include ``paged_vs_memcpy`` (the lower of the two ratios), ``paged_gather_vs_memcpy``,
    ``paged_scatter_vs_memcpy`` (medians of the per-round ratios), their 25th percentiles
    ``paged_gather_vs_memcpy_p25`` / ``paged_scatter_vs_memcpy_p25``, and the throughputs
    ``paged_gather_mbps``, ``paged_scatter_mbps``, ``memcpy_mbps`` (MB/s, medians). Torch runs
    on one thread unless ``threads`` says otherwise (``threads=None``: as it is set).

    Raises:
        ValueError: a bad option.
    """
    config = PagedBenchConfig(**options)  # type: ignore[arg-type]
    if config.threads is None:
        report = bench_paged(config)
    else:
        with torch_threads(config.threads):
            report = bench_paged(config)
    return {k: float(v) for k, v in report.values.items() if isinstance(v, int | float)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the paged benchmark."""
    add_common_arguments(parser, iters=15, warmup=2, quick_iters=3, quick_warmup=1)
    add = parser.add_argument
    add("--tokens", type=positive_int, help="tokens moved (default 2048; --quick 256)")
    add("--layers", type=positive_int, default=30, help="layers (default 30, SmolLM2-135M)")
    add("--kv-heads", type=positive_int, default=3, help="kv heads (default 3)")
    add("--head-dim", type=positive_int, default=64, help="head dim (default 64)")
    add("--block-size", type=positive_int, default=16, help="tokens per block (default 16)")
    add("--dtype", choices=sorted(_DTYPES), default="bfloat16", help="KV dtype (default bfloat16)")
    per_layer = [n for n in layout_names() if not get_layout(n).all_layers and not get_layout(n).is_mla]
    add("--layout", choices=per_layer, default="vllm_flash_nhd", help="page layout (default vllm_flash_nhd)")
    add("--threads", type=positive_int, default=1, help="torch threads while timing (default 1)")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed flags describe; print lines, a table and (--json) JSON."""
    config = PagedBenchConfig(
        num_layers=args.layers,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
        block_size=args.block_size,
        num_tokens=quick_default(args.tokens, 2048, 256, args.quick),
        layout=args.layout,
        iters=quick_default(args.iters, 15, 3, args.quick),
        warmup=quick_default(args.warmup, 2, 1, args.quick),
        seed=args.seed,
        threads=args.threads,
    )
    with torch_threads(args.threads):
        report = bench_paged(config)
    finish(report, bool(args.json))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m kvstore.benchmarks.paged [flags]``."""
    parser = argparse.ArgumentParser(prog="kvstore bench paged", description=(__doc__ or "").split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
