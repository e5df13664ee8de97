"""Sustained load with faults: many asyncio clients across tenants, a fault every interval.

    python -m tests.resilience.soak --duration 600 --clients 64 --tenants 4 --fault-interval 60

starts a real Redis and a real daemon (CPU, disk and Redis tiers, one token
per tenant), runs ``clients`` asyncio clients spread over the tenants (each
puts chunks, looks them up under a lease, reads them back under that lease,
releases it, and re-reads older chunks), and injects one fault per interval,
in turn: Redis paused (SIGSTOP) for a few seconds, Redis killed and
restarted, a client that dies in the middle of a frame, a burst of oversized
frames. It prints one line per window (ops, p99 latency, misses, errors) and
a JSON summary as the last line; it exits non-zero on any wrong answer, any
failed request, a leaked lease or a dead daemon.
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

from kvstore.client.aio import AsyncClient
from kvstore.errors import Busy
from kvstore.keys import Namespace
from kvstore.service.protocol import MsgType, frame, pack_prefix
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

    def summary(self) -> dict[str, object]:
        lat = np.array(self.latencies) if self.latencies else np.zeros(1)
        return {"t_s": round(self.start_s), "ops": len(self.latencies), "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 2),
                "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 2), "misses": self.misses,
                "errors": self.errors, "wrong": self.wrong, "fault": self.fault}


@dataclass
class Soak:
    duration_s: float
    clients: int
    tenants: int
    fault_interval_s: float
    pause_s: float
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


async def drive(s: Soak, d: DaemonProc, redis: RedisServer) -> None:
    toks = [t for t, tenant in tokens(s.tenants).items() if tenant != "*"]
    url = f"kvstore://127.0.0.1:{d.port}"
    t0 = time.monotonic()
    jobs = [client_loop(s, url, toks[i % s.tenants], namespace(f"soak-{i % s.tenants}"), i, t0)
            for i in range(s.clients)]
    faults = asyncio.create_task(faults_loop(s, redis, d, t0))
    await asyncio.gather(*jobs)
    faults.cancel()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def run(s: Soak, workdir: Path) -> dict[str, object]:
    """Run the soak; the summary (``ok`` is False on any failure)."""
    redis = RedisServer().start()
    d = DaemonProc(workdir, data_dir=workdir / "data", tokens=tokens(s.tenants),
                   args=("--cpu-bytes", "8MiB", "--disk-bytes", "32MiB", "--redis-url", redis.url))
    try:
        d.start()
        assert d.proc is not None
        rss0 = rss_bytes(d.proc.pid)
        asyncio.run(drive(s, d, redis))
        alive = d.proc.poll() is None
        leases = d.call("GET", "/v1/leases", token=ADMIN_TOKEN).json()["leases"] if alive else []
        rss1 = rss_bytes(d.proc.pid) if alive else 0
    finally:
        d.stop()
        d.kill()
        redis.close()
    rows = [w.summary() for w in s.windows]
    wrong, errors = sum(w.wrong for w in s.windows), sum(w.errors for w in s.windows)
    return {"ok": alive and wrong == 0 and errors == 0 and not leases, "alive": alive, "clients": s.clients,
            "tenants": s.tenants, "duration_s": s.duration_s, "ops": sum(len(w.latencies) for w in s.windows),
            "wrong": wrong, "errors": errors, "leaked_leases": len(leases), "faults": s.faults,
            "rss_start_mib": rss0 >> 20, "rss_end_mib": rss1 >> 20, "windows": rows,
            "error_samples": s.error_samples}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.resilience.soak", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load [600]")
    p.add_argument("--clients", type=int, default=64, help="asyncio clients [64]")
    p.add_argument("--tenants", type=int, default=4, help="tenants the clients are spread over [4]")
    p.add_argument("--fault-interval", type=float, default=60.0, help="seconds between faults [60]")
    p.add_argument("--pause", type=float, default=5.0, help="seconds Redis stays paused or down [5]")
    a = p.parse_args(argv)
    s = Soak(a.duration, a.clients, a.tenants, a.fault_interval, a.pause)
    with tempfile.TemporaryDirectory(prefix="kvs-soak-") as tmp:
        out = run(s, Path(tmp))
    for row in out["windows"]:  # type: ignore[attr-defined]
        print(json.dumps(row), file=sys.stderr)
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
