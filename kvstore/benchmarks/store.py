"""`kvstore bench store`: each tier against the plain operation it stands on, in one run.

All measurements use the same random bytes: ``--chunks`` chunks of
``--chunk-mib`` MiB (default: one 256-token chunk of Llama-3-8B in bf16,
32 layers x K,V x 256 tokens x 8 kv heads x 128 head dim x 2 bytes = 32 MiB).
A timed run moves one chunk (a batched run moves all of them); a tier and its
baselines run interleaved, and each figure is the median of ``--iters`` runs
after ``--warmup`` runs.

=========================  ========================================================
kvstore                    baseline measured in the same run
=========================  ========================================================
CPU tier put / get         ``np.copyto`` into a preallocated buffer (memcpy)
disk tier put / get        ``write()`` of a new file (+ ``fsync`` for
                           ``sync="commit"``), and over a cached file of the
                           same size / ``readinto`` from the page cache, and a
                           copy from an ``mmap`` of it
Redis tier put / get       redis-py (hiredis) SET / GET on one connection, and a
                           raw-socket RESP client, against the same server
prefix lookup (128k tok.)  ``hashlib.sha256(tokens.tobytes())``
index / tier metadata      none: bytes per entry traced with tracemalloc
=========================  ========================================================

Throughput ratios are kvstore / baseline (higher is better, 1.0 = as fast as
the baseline); the lookup ratios are time ratios (lower is better).

The sections are in kvstore.benchmarks.store_tiers (cpu, disk, redis) and
kvstore.benchmarks.store_lookup (lookup, memory); the config and the state of
one run, which they share, in kvstore.benchmarks.store_run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from kvstore.benchmarks.common import (
    Report,
    add_common_arguments,
    finish,
    positive_float,
    positive_int,
    progress,
)
from kvstore.benchmarks.store_lookup import lookup_section, memory_section
from kvstore.benchmarks.store_run import (
    BENCH_NS,
    LLAMA3_8B,
    MIB,
    SECTIONS,
    TINY_CHUNK,
    Rows,
    Run,
    StoreBenchConfig,
)
from kvstore.benchmarks.store_tiers import cpu_section, disk_section, redis_section

__all__ = [
    "BENCH_NS", "LLAMA3_8B", "MIB", "SECTIONS", "TINY_CHUNK", "Rows", "StoreBenchConfig", "add_arguments",
    "bench_store", "main", "run",
]

_SECTIONS: dict[str, Callable[[Run], None]] = {
    "cpu": cpu_section,
    "disk": disk_section,
    "redis": redis_section,
    "lookup": lookup_section,
    "memory": memory_section,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``kvstore bench store`` to ``parser``."""
    add_common_arguments(parser, iters=10, warmup=2, quick_iters=3, quick_warmup=1)
    add = parser.add_argument
    add("--chunks", type=positive_int, help="distinct chunks of random bytes (default 8; --quick 2)")
    add(
        "--chunk-mib",
        type=positive_float,
        help="MiB per chunk (default 32 = 256 tokens of Llama-3-8B; --quick 1)",
    )
    add(
        "--prompt-tokens",
        type=positive_int,
        default=131072,
        help="tokens of the looked-up prompt (default 131072)",
    )
    add("--index-entries", type=positive_int, help="prefix index entries traced (default 1e6; --quick 2e4)")
    add("--meta-entries", type=positive_int, help="CPU tier entries traced (default 1e5; --quick 5e3)")
    add("--disk-dir", help="directory for the disk tier and the baseline files (default: a temp dir)")
    add("--no-fsync", action="store_true", help="skip sync='commit' vs write()+fsync (skipped with --quick)")
    add("--redis-url", help="Redis to use (default: start a private redis-server on a free port)")
    add("--skip", action="append", choices=SECTIONS, help="a section not to run (repeatable)")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed flags describe; print lines, a table and (--json) JSON.

    Returns:
        The process exit status, 0; errors propagate as exceptions.
    """
    report = bench_store(StoreBenchConfig.from_args(args))
    finish(report, bool(args.json))
    return 0


def bench_store(config: StoreBenchConfig) -> Report:
    """Every section not skipped, on the same chunks; returns the report."""
    report = Report()
    for key in ("chunk_bytes", "chunks", "iters", "warmup"):
        report.record(key, getattr(config, key))
    todo = [s for s in SECTIONS if s not in config.skip]
    with progress(len(todo), "bench store", config.show_progress) as bar:
        r = Run(config, report)
        for name in todo:
            bar.set_postfix_str(name)
            _SECTIONS[name](r)
            bar.update(1)
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m kvstore.benchmarks.store [flags]``: the same as ``kvstore bench store``."""
    parser = argparse.ArgumentParser(prog="kvstore bench store", description=(__doc__ or "").split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
