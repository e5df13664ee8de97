"""``kvstore bench service --soak``: the daemon's memory under a long mixed load.

A real ``kvstore serve`` (CPU tier in /dev/shm + LMDB disk tier, small
budgets so that both tiers evict all the time) takes a mixed load from
client threads over the Unix socket (shared-memory path) and TCP: prompt
puts, lookups with leases followed by gets of the hit (every byte checked),
gets of absent keys, deletes, and an operator scraping ``/metrics`` and
``/v1/stats`` every second. Every sampling interval the daemon's memory is
read from ``/proc/<pid>/status`` and ``/proc/<pid>/smaps``:

- ``arena``: resident shared memory (the CPU tier's arena) -- bounded by the CPU budget;
- ``lmdb``: resident pages of the disk tier's memory map -- bounded by the map, i.e. the
  disk budget plus LMDB's slack (these are page cache the kernel may drop at any time);
- ``overhead``: everything else (interpreter, heap, buffers, libraries) -- what must stay
  under a fixed bound, independent of the budgets and of the run's length.

The run fails (non-zero exit) if a request fails for any reason other than
BUSY, if a read returns wrong bytes, if the arena exceeds the CPU budget, or
if the overhead exceeds ``--soak-overhead-mib``; it reports the overhead's
growth between the first and the last tenth of the run (a leak shows there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvstore.benchmarks.common import Report, free_port, percentile
from kvstore.client import Client
from kvstore.errors import Busy, KVStoreError
from kvstore.keys import Namespace, prefix_keys
from kvstore.spec import KVSpec, ModelFingerprint

MIB = 1 << 20
SOAK_NS = Namespace("kvstore-soak", KVSpec(ModelFingerprint("soak-1mib"), 16, 8, 128, "bfloat16"), chunk_tokens=16)
"""Namespace of the load: 16 tokens x 16 layers x 2 x 8 heads x 128 x bf16 = 1 MiB chunks."""
DEFAULT_OVERHEAD_MIB = 256
"""The documented bound on the daemon's memory beyond its arena and LMDB map (docs/daemon.md)."""


@dataclass(frozen=True, slots=True)
class SoakConfig:
    """One soak run.

    Attributes:
        seconds: length of the mixed load.
        cpu_bytes / disk_bytes: the daemon's budgets (small, so both tiers evict).
        workers: client threads; even ones use the Unix socket (shared memory), odd ones TCP.
        prompts: distinct prompts (each 1-8 chunks of 1 MiB); their total exceeds both budgets.
        sample_s: memory sampling interval.
        overhead_mib: the bound on memory beyond the arena and the LMDB map.
    """

    seconds: float = 600.0
    cpu_bytes: int = 256 * MIB
    disk_bytes: int = 512 * MIB
    workers: int = 4
    prompts: int = 400
    sample_s: float = 1.0
    overhead_mib: int = DEFAULT_OVERHEAD_MIB
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SoakConfig:
        quick = bool(args.quick)
        seconds = args.soak_s if args.soak_s is not None else (20.0 if quick else 600.0)
        return cls(
            seconds=seconds,
            cpu_bytes=(64 if quick else 256) * MIB,
            disk_bytes=(128 if quick else 512) * MIB,
            prompts=100 if quick else 400,
            overhead_mib=args.soak_overhead_mib,
            seed=args.seed,
        )


@dataclass
class Tally:
    """What the load did; updated under ``lock`` by every worker."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ops: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    busy: int = 0
    errors: list[str] = field(default_factory=list)
    wrong_bytes: int = 0
    hit_chunks: int = 0
    bytes_moved: int = 0

    def done(self, op: str, seconds: float, nbytes: int = 0) -> None:
        with self.lock:
            self.ops[op] = self.ops.get(op, 0) + 1
            if len(self.latencies) < 1_000_000:
                self.latencies.append(seconds)
            self.bytes_moved += nbytes


@dataclass(frozen=True, slots=True)
class MemorySample:
    t: float
    rss: int
    arena: int
    lmdb: int

    @property
    def overhead(self) -> int:
        return self.rss - self.arena - self.lmdb


def add_soak_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--soak", action="store_true", help="run the memory soak (a long mixed load) instead")
    parser.add_argument("--soak-s", type=float, default=None, help="soak length in seconds (default 600; --quick 20)")
    parser.add_argument(
        "--soak-overhead-mib",
        type=int,
        default=DEFAULT_OVERHEAD_MIB,
        help=f"fail if memory beyond the arena and the LMDB map exceeds this (default {DEFAULT_OVERHEAD_MIB})",
    )


# -- the daemon ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SoakDaemon:
    proc: subprocess.Popen[bytes]
    admin_port: int
    port: int
    unix_path: str


@contextlib.contextmanager
def soak_daemon(cfg: SoakConfig, workdir: Path) -> Iterator[SoakDaemon]:
    """``kvstore serve`` with the soak's budgets, on free ports; stopped with SIGTERM on exit."""
    admin, port, unix = free_port(), free_port(), str(workdir / "kv.sock")
    argv = [
        sys.executable, "-m", "kvstore.cli", "serve", "--admin-port", str(admin), "--port", str(port),
        "--unix-path", unix, "--data-dir", str(workdir / "data"), "--cpu-bytes", str(cfg.cpu_bytes),
        "--disk-bytes", str(cfg.disk_bytes), "--history-interval-s", "1", "--log-level", "warning",
    ]  # fmt: skip
    with open(workdir / "daemon.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {proc.returncode}: {(workdir / 'daemon.log').read_text()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as r:
                    if r.status == 200 and os.path.exists(unix):
                        break
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon did not become ready within 60 s")
            time.sleep(0.2)
        yield SoakDaemon(proc, admin, port, unix)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def read_memory(pid: int) -> MemorySample:
    """Resident memory of ``pid``: total, its shared-memory arena, and LMDB's mapped pages."""
    status: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssShmem"):
                status[name] = int(value.split()[0]) * 1024
    lmdb, current = 0, ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                current = line.rstrip("\n")
            elif first == "Rss:" and current.endswith("/data.mdb"):
                lmdb += int(line.split()[1]) * 1024
    return MemorySample(time.monotonic(), status.get("VmRSS", 0), status.get("RssShmem", 0), lmdb)


# -- the load --------------------------------------------------------------------------------------
def _prompt_tokens(seed: int, prompt: int) -> np.ndarray:
    rng = np.random.default_rng((seed, prompt))
    chunks = int(rng.integers(1, 9))
    return rng.integers(0, 50_000, chunks * SOAK_NS.chunk_tokens, dtype=np.uint32)


def _chunk_for(key: bytes, nbytes: int) -> np.ndarray:
    """The bytes stored under ``key``: a 4 KiB block derived from the key, repeated (checkable on read)."""
    block = np.random.default_rng(int.from_bytes(key[:8], "little")).integers(0, 256, 4096, dtype=np.uint8)
    return np.tile(block, nbytes // 4096)


def _worker(cfg: SoakConfig, url: str, index: int, stop: threading.Event, tally: Tally) -> None:
    rng = np.random.default_rng((cfg.seed, 1000 + index))
    nbytes = SOAK_NS.chunk_nbytes
    outs = [np.empty(nbytes, np.uint8) for _ in range(8)]
    with Client.connect(url, pool_size=1, timeout_s=60) as kv:
        ns = kv.register(SOAK_NS)
        while not stop.is_set():
            prompt = int(rng.integers(0, cfg.prompts))
            tokens = _prompt_tokens(cfg.seed, prompt)
            op = rng.choice(["put", "lookup_get", "miss", "delete"], p=[0.35, 0.4, 0.15, 0.1])
            started = time.perf_counter()
            try:
                if op == "put":
                    keys = prefix_keys(ns, tokens)
                    kv.put_many(ns, keys, [_chunk_for(k, nbytes) for k in keys])
                    tally.done("put", time.perf_counter() - started, len(keys) * nbytes)
                elif op == "lookup_get":
                    hit = kv.lookup(ns, tokens)
                    got = kv.get_many(ns, list(hit.keys), outs[: len(hit.keys)], lease=hit.lease) if hit.keys else []
                    kv.release(hit)
                    wrong = sum(
                        1
                        for k, size, out in zip(hit.keys, got, outs)
                        if size is not None and not np.array_equal(out[:size], _chunk_for(k, nbytes))
                    )
                    with tally.lock:
                        tally.wrong_bytes += wrong
                        tally.hit_chunks += sum(s is not None for s in got)
                    tally.done("lookup_get", time.perf_counter() - started, sum(s or 0 for s in got))
                elif op == "miss":
                    absent = rng.integers(0, 256, 32, dtype=np.uint8).tobytes()
                    if kv.get(ns, absent, outs[0]) is not None:
                        raise RuntimeError("a random key was found")
                    tally.done("miss", time.perf_counter() - started)
                else:
                    kv.delete_many(ns, prefix_keys(ns, tokens))
                    tally.done("delete", time.perf_counter() - started)
            except Busy:
                with tally.lock:
                    tally.busy += 1
            except (KVStoreError, OSError, RuntimeError) as exc:
                with tally.lock:
                    tally.errors.append(f"{op}: {type(exc).__name__}: {exc}")


def _operator(admin_port: int, stop: threading.Event, tally: Tally, tier_peaks: dict[str, int]) -> None:
    """Scrape /metrics and /v1/stats every second, as a monitoring system would."""
    base = f"http://127.0.0.1:{admin_port}"
    while not stop.wait(1.0):
        try:
            with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
                r.read()
            with urllib.request.urlopen(base + "/v1/stats", timeout=10) as r:
                stats = json.loads(r.read())
            for tier in stats["tiers"]:
                tier_peaks[tier["name"]] = max(tier_peaks.get(tier["name"], 0), int(tier["used_bytes"]))
            tally.done("admin", 0.0)
        except (OSError, ValueError, KeyError) as exc:
            with tally.lock:
                tally.errors.append(f"admin: {type(exc).__name__}: {exc}")


def run_soak(cfg: SoakConfig, show_progress: bool = True) -> tuple[Report, bool]:
    """Run the soak; the report and whether every check passed."""
    report, tally = Report(), Tally()
    tier_peaks: dict[str, int] = {}
    samples: list[MemorySample] = []
    workdir = Path(tempfile.mkdtemp(prefix="kvsoak-", dir="/tmp"))
    try:
        with soak_daemon(cfg, workdir) as d:
            stop = threading.Event()
            urls = [f"unix://{d.unix_path}", f"kvstore://127.0.0.1:{d.port}"]
            threads = [
                threading.Thread(target=_worker, args=(cfg, urls[i % 2], i, stop, tally), daemon=True)
                for i in range(cfg.workers)
            ]
            threads.append(threading.Thread(target=_operator, args=(d.admin_port, stop, tally, tier_peaks), daemon=True))
            for t in threads:
                t.start()
            started = time.monotonic()
            next_note = started + 60
            while time.monotonic() - started < cfg.seconds:
                samples.append(read_memory(d.proc.pid))
                if show_progress and time.monotonic() >= next_note:
                    s = samples[-1]
                    print(
                        f"soak {time.monotonic() - started:5.0f}s: ops {sum(tally.ops.values())}, "
                        f"rss {s.rss / MIB:.0f} MiB (arena {s.arena / MIB:.0f}, lmdb {s.lmdb / MIB:.0f}, "
                        f"overhead {s.overhead / MIB:.0f})",
                        file=sys.stderr,
                    )
                    next_note += 60
                time.sleep(cfg.sample_s)
            stop.set()
            for t in threads:
                t.join(timeout=120)
            samples.append(read_memory(d.proc.pid))
            with urllib.request.urlopen(f"http://127.0.0.1:{d.admin_port}/v1/stats", timeout=10) as r:
                final = json.loads(r.read())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _report(cfg, report, tally, samples, tier_peaks, final)


def _report(
    cfg: SoakConfig,
    report: Report,
    tally: Tally,
    samples: list[MemorySample],
    tier_peaks: dict[str, int],
    final: dict[str, object],
) -> tuple[Report, bool]:
    tenth = max(1, len(samples) // 10)
    first = percentile([s.overhead for s in samples[:tenth]], 50)
    last = percentile([s.overhead for s in samples[-tenth:]], 50)
    peak = max(samples, key=lambda s: s.rss)
    arena_max = max(s.arena for s in samples)
    overhead_max = max(s.overhead for s in samples)
    ops = sum(v for k, v in tally.ops.items() if k != "admin")
    lat = sorted(tally.latencies) or [0.0]
    store = final.get("store", {}) if isinstance(final, dict) else {}
    values: dict[str, float | int] = {
        "soak_s": cfg.seconds,
        "soak_ops": ops,
        "soak_gb_moved": round(tally.bytes_moved / 1e9, 2),
        "soak_hit_chunks": tally.hit_chunks,
        "soak_busy": tally.busy,
        "soak_errors": len(tally.errors),
        "soak_wrong_reads": tally.wrong_bytes,
        "soak_cpu_budget_mib": cfg.cpu_bytes // MIB,
        "soak_disk_budget_mib": cfg.disk_bytes // MIB,
        "soak_rss_max_mib": round(peak.rss / MIB, 1),
        "soak_arena_max_mib": round(arena_max / MIB, 1),
        "soak_lmdb_max_mib": round(max(s.lmdb for s in samples) / MIB, 1),
        "soak_overhead_max_mib": round(overhead_max / MIB, 1),
        "soak_overhead_growth_mib": round((last - first) / MIB, 1),
        "soak_cpu_tier_max_mib": round(tier_peaks.get("cpu", 0) / MIB, 1),
        "soak_disk_tier_max_mib": round(tier_peaks.get("disk", 0) / MIB, 1),
        "soak_op_p50_ms": round(percentile(lat, 50) * 1e3, 2),
        "soak_op_p99_ms": round(percentile(lat, 99) * 1e3, 2),
        "soak_leases_after": int(store.get("leases", 0)) if isinstance(store, dict) else -1,
    }
    for key, value in values.items():
        report.record(key, value)
    for key, value in values.items():
        report.row(key, str(value), "", "", key)
    checks = {
        "no request failed (BUSY aside)": not tally.errors,
        "every read returned the bytes stored": tally.wrong_bytes == 0,
        "arena within the CPU budget": arena_max <= cfg.cpu_bytes + 16 * MIB,
        "CPU tier within its budget": tier_peaks.get("cpu", 0) <= cfg.cpu_bytes,
        "disk tier within its budget": tier_peaks.get("disk", 0) <= cfg.disk_bytes,
        f"overhead within {cfg.overhead_mib} MiB": overhead_max <= cfg.overhead_mib * MIB,
        "load ran": ops > 0 and tally.hit_chunks > 0,
    }
    for name, ok in checks.items():
        report.note(f"{'ok  ' if ok else 'FAIL'} {name}")
    for err in tally.errors[:10]:
        report.note(f"error: {err}")
    passed = all(checks.values())
    report.record("soak_passed", passed)
    return report, passed
