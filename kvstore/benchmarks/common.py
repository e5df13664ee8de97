"""Shared machinery of the benchmarks: timing loops, a report, the common flags.

Every benchmark measures its baseline in the same run and reports ratios.
Timings are medians over repeated runs after a warm-up, because the machines
they run on are small and noisy; the raw samples stay available for
percentiles. Output has two forms: lines and a table for people on stdout,
and with ``--json`` one JSON object as the very last line of stdout for
scripts. Progress goes to stderr, so it never mixes with either.

The plain baselines (file write/read, a raw-socket Redis client, traced
memory) live in kvstore.benchmarks.baselines and the throwaway redis-server
in kvstore.benchmarks.local_redis; both are re-exported here.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from tqdm import tqdm

from kvstore.benchmarks.baselines import U8, RawRedis, read_file_into, traced_bytes, write_file
from kvstore.benchmarks.local_redis import LocalRedis, free_port, local_redis, redis_url_or_local

__all__ = [
    "U8", "Case", "JSONValue", "LocalRedis", "Op", "RawRedis", "Report", "Timing", "add_common_arguments",
    "finish", "format_rate", "format_ratio", "format_seconds", "free_port", "gc_paused", "local_redis",
    "measure", "measure_interleaved", "nonnegative_int", "percentile", "positive_float", "positive_int",
    "progress", "quick_default", "read_file_into", "redis_url_or_local", "say", "traced_bytes", "write_file",
]

Op = Callable[[int], object]
"""One benchmarked operation; it receives the iteration number (warm-up first)."""

JSONValue = float | int | str | bool | None
T = TypeVar("T", int, float)


@dataclass(frozen=True, slots=True)
class Timing:
    """Wall-clock seconds of each measured run of one operation (warm-up excluded)."""

    samples: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("a timing needs at least one sample")

    @property
    def median(self) -> float:
        return percentile(self.samples, 50.0)

    def percentile(self, q: float) -> float:
        return percentile(self.samples, q)

    def rate(self, nbytes: int) -> float:
        """Bytes per second of an operation moving ``nbytes``, from the median time."""
        return nbytes / self.median


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between ranks.

    Raises:
        ValueError: no samples, or ``q`` outside [0, 100].
    """
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True, slots=True)
class Case:
    """One operation to time, with untimed work around each run.

    ``setup(i)`` and ``teardown(i)`` run before and after ``op(i)`` outside
    the timed region (e.g. deleting what a put stored, so the next put
    really copies again).
    """

    op: Op
    setup: Op | None = None
    teardown: Op | None = None


def measure(
    op: Op,
    *,
    iters: int,
    warmup: int = 1,
    setup: Op | None = None,
    teardown: Op | None = None,
    tick: Callable[[], None] | None = None,
) -> Timing:
    """Time ``op(i)`` for ``warmup + iters`` runs; the first ``warmup`` are discarded.

    See :func:`measure_interleaved`, of which this is the one-case form.
    """
    return measure_interleaved({"op": Case(op, setup, teardown)}, iters=iters, warmup=warmup, tick=tick)["op"]


def measure_interleaved(
    cases: Mapping[str, Case], *, iters: int, warmup: int = 1, tick: Callable[[], None] | None = None
) -> dict[str, Timing]:
    """Time several cases round-robin: run i of every case, then run i + 1 of every case.

    Interleaving makes a case and its baseline see the same background load
    on a noisy machine, instead of one of them catching a burst alone. The
    first ``warmup`` runs of each case are discarded; the garbage collector
    is paused while timing; ``tick`` is called after each round.

    Raises:
        ValueError: ``iters`` < 1, ``warmup`` < 0 or no cases.
    """
    if iters < 1 or warmup < 0 or not cases:
        raise ValueError("need iters >= 1, warmup >= 0 and at least one case")
    samples: dict[str, list[float]] = {name: [] for name in cases}
    clock = time.perf_counter
    with gc_paused():
        for i in range(warmup + iters):
            for name, case in cases.items():
                if case.setup is not None:
                    case.setup(i)
                t0 = clock()
                case.op(i)
                elapsed = clock() - t0
                if case.teardown is not None:
                    case.teardown(i)
                if i >= warmup:
                    samples[name].append(elapsed)
            if tick is not None:
                tick()
    return {name: Timing(tuple(s)) for name, s in samples.items()}


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (restored on exit, as it was)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def format_rate(bytes_per_s: float) -> str:
    """``12.3 GB/s`` or ``456 MB/s`` (decimal units)."""
    if bytes_per_s >= 1e9:
        return f"{bytes_per_s / 1e9:.2f} GB/s"
    return f"{bytes_per_s / 1e6:.0f} MB/s"


def format_seconds(seconds: float) -> str:
    """``1.23 ms``, ``45.6 us`` or ``2.10 s``."""
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def format_ratio(ratio: float) -> str:
    return f"{ratio:.2f}x"


@dataclass(slots=True)
class Report:
    """What a benchmark found: JSON values by key, table rows, and notes.

    Each comparison records the raw figures (``<name>_mbps`` or ``<name>_ms``,
    once per name, so a shared baseline is recorded once) and the ratio under
    its own key, prints one line as it is measured, and adds a table row.

    Invariant: keys are unique; a float that is not finite is stored as None,
    so the JSON output is always strict JSON (which has no NaN).
    """

    headers: tuple[str, ...] = ("measurement", "kvstore", "baseline", "ratio", "json key")
    values: dict[str, JSONValue] = field(default_factory=dict)
    rows: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def record(self, key: str, value: JSONValue) -> None:
        """Set one JSON value; floats that are NaN or infinite become None.

        Raises:
            ValueError: ``key`` was recorded before.
        """
        if key in self.values:
            raise ValueError(f"report key {key!r} recorded twice")
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        self.values[key] = value

    def row(self, *cells: str) -> None:
        if len(cells) != len(self.headers):
            raise ValueError(f"a row of {len(cells)} cells for {len(self.headers)} columns")
        self.rows.append(tuple(cells))

    def note(self, text: str) -> None:
        """A line printed under the table (skipped parts, caveats)."""
        self.notes.append(text)

    def throughput(self, name: str, timing: Timing, nbytes: int) -> float:
        """Bytes/s of ``timing`` moving ``nbytes``; records ``<name>_mbps`` (MB/s) the first time."""
        rate = timing.rate(nbytes)
        if f"{name}_mbps" not in self.values:
            self.record(f"{name}_mbps", round(rate / 1e6, 1))
        return rate

    def compare_rates(
        self, label: str, ratio_key: str, timings: Mapping[str, Timing], ours: str, base: str, nbytes: int
    ) -> float:
        """Throughput of ``timings[ours]`` over ``timings[base]``'s (higher is better); returns the ratio."""
        ours_rate = self.throughput(ours, timings[ours], nbytes)
        base_rate = self.throughput(base, timings[base], nbytes)
        ratio = ours_rate / base_rate
        self.record(ratio_key, round(ratio, 3))
        self._line(
            label, format_rate(ours_rate), f"{base} {format_rate(base_rate)}", format_ratio(ratio), ratio_key
        )
        return ratio

    def compare_times(
        self, label: str, ratio_key: str, timings: Mapping[str, Timing], ours: str, base: str
    ) -> float:
        """Median time of ``timings[ours]`` over ``timings[base]``'s (lower is better); returns the ratio.

        Records ``<name>_ms`` for both (once per name).
        """
        for name in (ours, base):
            if f"{name}_ms" not in self.values:
                self.record(f"{name}_ms", round(timings[name].median * 1e3, 4))
        ratio = timings[ours].median / timings[base].median
        self.record(ratio_key, round(ratio, 3))
        baseline = f"{base} {format_seconds(timings[base].median)}"
        self._line(
            label, format_seconds(timings[ours].median), baseline, f"{format_ratio(ratio)} time", ratio_key
        )
        return ratio

    def absolute(self, label: str, key: str, value: float, unit: str) -> None:
        """A figure with no baseline (e.g. bytes per entry)."""
        self.record(key, round(value, 1))
        self._line(label, f"{value:,.0f} {unit}", "-", "-", key)

    def _line(self, label: str, ours: str, baseline: str, ratio: str, key: str) -> None:
        self.row(label, ours, baseline, ratio, key)
        versus = f"vs {baseline}" if baseline != "-" else ""
        say(f"{label:<40} {ours:>12}   {versus:<32} {ratio}")

    def table(self) -> str:
        """The rows as an aligned plain-text table with a header rule, then the notes."""
        widths = [max(len(r[c]) for r in [self.headers, *self.rows]) for c in range(len(self.headers))]
        rows = [self.headers, *self.rows]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def json_line(self) -> str:
        """The values as one line of strict JSON."""
        return json.dumps(self.values, allow_nan=False, separators=(",", ":"))


def say(text: str) -> None:
    """Print a progress line on stdout without tearing a live progress bar."""
    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


def progress(total: int, desc: str, enabled: bool = True) -> tqdm[None]:
    """A progress bar on stderr; hidden when stderr is not a terminal or not ``enabled``."""
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, disable=None if enabled else True)


def add_common_arguments(
    parser: argparse.ArgumentParser, *, iters: int, warmup: int, quick_iters: int, quick_warmup: int
) -> None:
    """The flags every benchmark takes: --iters, --warmup, --json, --quick, --seed, --no-progress.

    --iters and --warmup default to None so that :func:`quick_default` can
    pick the full or the ``--quick`` value; the help text names both.
    """
    parser.add_argument(
        "--iters",
        type=positive_int,
        help=f"timed runs per measurement (default {iters}; --quick {quick_iters})",
    )
    parser.add_argument(
        "--warmup",
        type=nonnegative_int,
        help=f"untimed runs before them (default {warmup}; --quick {quick_warmup})",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object as the last line of stdout"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small, fast configuration (tests, smoke runs)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def quick_default(value: T | None, full: T, quick: T, is_quick: bool) -> T:
    """A flag's value if given, else its ``--quick`` or its full default."""
    if value is not None:
        return value
    return quick if is_quick else full


def finish(report: Report, as_json: bool) -> None:
    """Print the table, then (with ``as_json``) the JSON object as the very last line."""
    print()
    print(report.table())
    if as_json:
        print(report.json_line())
    sys.stdout.flush()


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value
