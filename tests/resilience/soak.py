"""Sustained load with faults: many asyncio clients across tenants, a fault every interval.

    python -m tests.resilience.soak --duration 600 --clients 64 --tenants 4 --fault-interval 60

starts a real Redis and a real daemon (CPU, disk and Redis tiers, one token
per tenant), runs ``clients`` asyncio clients spread over the tenants (each
puts chunks, looks them up under a lease, reads them back under that lease,
releases it, and re-reads older chunks), and injects one fault per interval,
in turn: Redis paused (SIGSTOP) for a few seconds, Redis killed and
restarted, a client that dies in the middle of a frame, a burst of oversized
frames. The daemon's resident memory is read from /proc/<pid>/smaps every
second and split as docs/daemon.md "Memory" bounds it: the CPU tier's arena,
the LMDB map's pages, and the overhead (everything else). It prints one line
per window (ops, p50/p99 latency, misses, errors, memory split) and a JSON
summary as the last line; it exits non-zero on any wrong answer, any failed
request, a lease, connection or reservation still open once the clients
left, a dead daemon, or a part of memory beyond its bound (the overhead's:
``--overhead-mib`` plus 400 bytes per chunk the tiers can hold).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvstore.benchmarks.service_soak import DEFAULT_OVERHEAD_MIB
from kvstore.client.aio import AsyncClient
from kvstore.errors import Busy
from kvstore.keys import Namespace
from kvstore.service.protocol import MsgType, frame, pack_prefix
from kvstore.tiers.disk_config import DiskTierConfig
from tests.redis_servers import RedisServer
from tests.resilience.common import CHUNK, key_of, payload
from tests.service.daemon_fixtures import ADMIN_TOKEN, DaemonProc, namespace

FAULTS = ("redis_pause", "redis_restart", "client_dies_mid_frame", "oversized_burst")


@dataclass
class Window:
    """What happened in one interval."""

    start_s: float
    latencies: list[float] = field(default_factory=list)
    misses: int = 0
    errors: int = 0
    wrong: int = 0
    fault: str = ""
    memory: list[Memory] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        lat = np.array(self.latencies) if self.latencies else np.zeros(1)
        mem = self.memory[-1] if self.memory else Memory(0, 0, 0)
        return {"t_s": round(self.start_s), "ops": len(self.latencies), "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 2),
                "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 2), "misses": self.misses,
                "errors": self.errors, "wrong": self.wrong, "fault": self.fault,
                "rss_mib": mib(mem.rss), "arena_mib": mib(mem.arena), "lmdb_mib": mib(mem.lmdb),
                "overhead_mib": mib(mem.overhead),
                "overhead_max_mib": mib(max((m.overhead for m in self.memory), default=0))}


@dataclass(frozen=True, slots=True)
class Memory:
    """The daemon's resident memory split as docs/daemon.md "Memory" bounds it."""

    rss: int
    arena: int
    lmdb: int

    @property
    def overhead(self) -> int:
        """Everything but the CPU tier's arena and the LMDB map: bounded by ``OVERHEAD_BOUND``."""
        return self.rss - self.arena - self.lmdb


def mib(n: int) -> float:
    return round(n / (1 << 20), 1)


def read_memory(pid: int, arena_bytes: int = 0) -> Memory:
    """``pid``'s resident memory from /proc/<pid>/smaps: total, the CPU tier's arena, the LMDB map.

    The arena is the mapping in /dev/shm (shared-memory path) or the one
    anonymous mapping of exactly ``arena_bytes`` (rounded to pages); LMDB's
    map is the mapping of ``data.mdb``.
    """
    rss = arena = lmdb = 0
    current, size, want = "", 0, -(-arena_bytes // 4096) * 4096
    with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as f:
        for line in f:
            first = line.split(maxsplit=1)[0] if line.strip() else ""
            if "-" in first and not first.endswith(":"):
                current = line.rstrip("\n")
                lo, hi = first.split("-")
                size = int(hi, 16) - int(lo, 16)
            elif first == "Rss:":
                kib = int(line.split()[1]) << 10
                rss += kib
                if current.endswith("/data.mdb"):
                    lmdb += kib
                elif " /dev/shm/" in current or (size == want and len(current.split()) == 5):
                    arena += kib
    return Memory(rss, arena, lmdb)


@dataclass
class Soak:
    duration_s: float
    clients: int
    tenants: int
    fault_interval_s: float
    pause_s: float
    overhead_mib: int = DEFAULT_OVERHEAD_MIB
    windows: list[Window] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)

    def window(self, now: float) -> Window:
        while not self.windows or now - self.windows[-1].start_s >= self.fault_interval_s:
            self.windows.append(Window(len(self.windows) * self.fault_interval_s))
        return self.windows[-1]


def tokens(n: int) -> dict[str, str]:
    out = {f"soak-tenant-{i}-token-000000": f"soak-{i}" for i in range(n)}
    return {**out, ADMIN_TOKEN: "*"}


async def client_loop(s: Soak, url: str, token: str, ns: Namespace, idx: int, t0: float) -> None:
    rng = random.Random(idx)
    c = await AsyncClient.connect(url, token=token, timeout_s=30.0, retries=3, use_shm=False)
    try:
        await c.register(ns)
        n = 0
        while (now := time.monotonic() - t0) < s.duration_s:
            w = s.window(now)
            start = time.monotonic()
            try:
                n = await one_op(c, ns, idx, n, rng, w)
            except Busy:
                await asyncio.sleep(0.01)
            except Exception as exc:  # noqa: BLE001  # counted: the soak fails on any request error
                w.errors += 1
                if len(s.error_samples) < 20:
                    s.error_samples.append(f"client {idx}: {type(exc).__name__}: {exc}")
            w.latencies.append(time.monotonic() - start)
    finally:
        await c.close()


async def one_op(c: AsyncClient, ns: Namespace, idx: int, n: int, rng: random.Random, w: Window) -> int:
    """Put 4 new chunks, or lookup+get+release 4 recent ones, or re-read 4 older ones; returns ``n``."""
    op = rng.random()
    if op < 0.4 or n < 8:
        keys = [key_of(f"soak-{idx}", n + i) for i in range(4)]
        await c.put_many(ns, keys, [payload(k) for k in keys])
        return n + 4
    first = rng.randrange(max(0, n - 16), n - 4) if op < 0.8 else rng.randrange(0, n - 4)
    keys = [key_of(f"soak-{idx}", first + i) for i in range(4)]
    lease = None
    if op < 0.8:
        hit = await c.lookup(ns, keys=keys, ttl_s=30.0)
        lease = hit.lease
    outs = [bytearray(CHUNK) for _ in keys]
    try:
        sizes = await c.get_many(ns, keys, outs, lease=lease)
    finally:
        if lease is not None:
            await c.release(lease)
    for k, out, size in zip(keys, outs, sizes):
        if size is None:
            w.misses += 1
        elif size != CHUNK or bytes(out) != payload(k):
            w.wrong += 1
    return n


def inject(fault: str, redis: RedisServer, d: DaemonProc, pause_s: float) -> None:
    """One fault the daemon must survive without a restart (runs in a worker thread)."""
    if fault == "redis_pause":
        redis.pause()
        time.sleep(pause_s)
        redis.resume()
    elif fault == "redis_restart":
        redis.kill()
        time.sleep(pause_s / 2)
        redis.start()
    elif fault == "client_dies_mid_frame":
        for _ in range(8):
            with socket.create_connection(("127.0.0.1", d.port), timeout=5) as sock:
                sock.sendall(frame(MsgType.HELLO, 1, {"token": next(iter(tokens(1)))}))
                sock.sendall(pack_prefix(MsgType.PUT, 200, 2, 1 << 20) + bytes(150))  # header cut short
    else:  # oversized_burst
        for _ in range(32):
            with socket.create_connection(("127.0.0.1", d.port), timeout=5) as sock:
                sock.sendall(frame(MsgType.HELLO, 1, {"token": next(iter(tokens(1)))}))
                sock.sendall(pack_prefix(MsgType.PUT, 2, 2, 1 << 50) + b"\x80\x80")
                sock.settimeout(5)
                while sock.recv(65536):  # error marked closing, then EOF
                    pass


async def faults_loop(s: Soak, redis: RedisServer, d: DaemonProc, t0: float) -> None:
    i = 0
    while True:
        await asyncio.sleep(max(0.0, (i + 0.5) * s.fault_interval_s - (time.monotonic() - t0)))
        if time.monotonic() - t0 >= s.duration_s - s.pause_s:
            return
        fault = FAULTS[i % len(FAULTS)]
        s.window(time.monotonic() - t0).fault = fault
        s.faults.append(fault)
        await asyncio.to_thread(inject, fault, redis, d, s.pause_s)
        i += 1


async def memory_loop(s: Soak, pid: int, t0: float) -> None:
    """Sample the daemon's memory split every second into the current window."""
    while True:
        s.window(time.monotonic() - t0).memory.append(read_memory(pid, CPU_BYTES))
        await asyncio.sleep(1.0)


async def drive(s: Soak, d: DaemonProc, redis: RedisServer) -> None:
    toks = [t for t, tenant in tokens(s.tenants).items() if tenant != "*"]
    url = f"kvstore://127.0.0.1:{d.port}"
    t0 = time.monotonic()
    jobs = [client_loop(s, url, toks[i % s.tenants], namespace(f"soak-{i % s.tenants}"), i, t0)
            for i in range(s.clients)]
    faults = asyncio.create_task(faults_loop(s, redis, d, t0))
    assert d.proc is not None
    sampler = asyncio.create_task(memory_loop(s, d.proc.pid, t0))
    await asyncio.gather(*jobs)
    faults.cancel()
    sampler.cancel()


CPU_BYTES, DISK_BYTES, REDIS_BYTES = 12 << 20, 32 << 20, 64 << 20  # 12 MiB: no thread stack (8 MiB) looks like the arena
LMDB_BOUND = DiskTierConfig("-", DISK_BYTES).map_size  # as kvstore.builder configures it
"""docs/daemon.md "Memory": the LMDB map's resident pages stay within the map."""
INDEX_BYTES_PER_CHUNK = 400
"""docs/daemon.md "Memory": metadata per chunk a tier holds (CPU and disk index, Redis ledger)."""
MAX_CHUNKS = CPU_BYTES // CHUNK + DISK_BYTES // (CHUNK + 104) + REDIS_BYTES // CHUNK


def overhead_bound(fixed_mib: int) -> int:
    """The documented bound on memory beyond the arena and the LMDB map, for this soak's budgets."""
    return (fixed_mib << 20) + INDEX_BYTES_PER_CHUNK * MAX_CHUNKS


def settle(d: DaemonProc, timeout_s: float = 15.0) -> dict[str, int]:
    """After the clients left: live leases, open connections and reservations (all must reach 0)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = d.call("GET", "/v1/stats", token=ADMIN_TOKEN).json()
        dp = stats.get("data_plane") or {}
        left = {"leases": len(d.call("GET", "/v1/leases", token=ADMIN_TOKEN).json()["leases"]),
                "connections": int(dp.get("connections", 0)), "reservations": int(dp.get("reservations", 0)),
                "shm_pins": int(dp.get("shm_pins", 0))}
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def run(s: Soak, workdir: Path) -> dict[str, object]:
    """Run the soak; the summary (``ok`` is False on any failure)."""
    redis = RedisServer().start()
    d = DaemonProc(workdir, data_dir=workdir / "data", tokens=tokens(s.tenants),
                   args=("--cpu-bytes", str(CPU_BYTES), "--disk-bytes", str(DISK_BYTES), "--redis-url", redis.url,
                         "--redis-bytes", str(REDIS_BYTES)))
    try:
        d.start()
        assert d.proc is not None
        mem0 = read_memory(d.proc.pid, CPU_BYTES)
        asyncio.run(drive(s, d, redis))
        alive = d.proc.poll() is None
        left = settle(d) if alive else {}
        mem1 = read_memory(d.proc.pid, CPU_BYTES) if alive else Memory(0, 0, 0)
    finally:
        d.stop()
        d.kill()
        redis.close()
    rows = [w.summary() for w in s.windows]
    wrong, errors = sum(w.wrong for w in s.windows), sum(w.errors for w in s.windows)
    samples = [m for w in s.windows for m in w.memory] or [mem0]
    peaks = {"arena": max(m.arena for m in samples), "lmdb": max(m.lmdb for m in samples),
             "overhead": max(m.overhead for m in samples)}
    bounds = {"arena": CPU_BYTES + (1 << 20), "lmdb": LMDB_BOUND, "overhead": overhead_bound(s.overhead_mib)}
    over = [f"{k} {mib(peaks[k])} MiB > {mib(bounds[k])} MiB" for k in peaks if peaks[k] > bounds[k]]
    ok = alive and wrong == 0 and errors == 0 and not any(left.values()) and not over
    tenth = max(1, len(samples) // 10)
    growth = (np.median([m.overhead for m in samples[-tenth:]]) - np.median([m.overhead for m in samples[:tenth]]))
    return {"ok": ok, "alive": alive, "clients": s.clients,
            "tenants": s.tenants, "duration_s": s.duration_s, "ops": sum(len(w.latencies) for w in s.windows),
            "wrong": wrong, "errors": errors, "leaked_leases": left.get("leases", 0), "left_after": left,
            "faults": s.faults, "overhead_growth_mib": mib(int(growth)),
            "rss_start_mib": mib(mem0.rss), "rss_end_mib": mib(mem1.rss),
            "overhead_start_mib": mib(mem0.overhead), "overhead_end_mib": mib(mem1.overhead),
            "peak_mib": {k: mib(v) for k, v in peaks.items()}, "bound_mib": {k: mib(v) for k, v in bounds.items()},
            "over_budget": over, "windows": rows, "error_samples": s.error_samples}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.resilience.soak", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load [600]")
    p.add_argument("--clients", type=int, default=64, help="asyncio clients [64]")
    p.add_argument("--tenants", type=int, default=4, help="tenants the clients are spread over [4]")
    p.add_argument("--fault-interval", type=float, default=60.0, help="seconds between faults [60]")
    p.add_argument("--pause", type=float, default=5.0, help="seconds Redis stays paused or down [5]")
    p.add_argument("--overhead-mib", type=int, default=DEFAULT_OVERHEAD_MIB,
                   help=f"fail if memory beyond the arena and the LMDB map exceeds this [{DEFAULT_OVERHEAD_MIB}]")
    a = p.parse_args(argv)
    s = Soak(a.duration, a.clients, a.tenants, a.fault_interval, a.pause, a.overhead_mib)
    with tempfile.TemporaryDirectory(prefix="kvs-soak-") as tmp:
        out = run(s, Path(tmp))
    for row in out["windows"]:  # type: ignore[attr-defined]
        print(json.dumps(row), file=sys.stderr)
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
