"""`kvstore bench service`: the daemon's data plane against the plain transfers it stands on.

One run, the same chunks for every figure (default: 32 MiB, one 256-token
chunk of Llama-3-8B in bf16: 32 layers x K,V x 256 tokens x 8 kv heads x 128
head dim x 2 bytes), a data-plane server in a process of its own:

=============================  ====================================================
kvstore                        baseline measured in the same run
=============================  ====================================================
client get / put, shm path     ``np.copyto`` into a preallocated buffer (memcpy)
client get / put, TCP          a raw TCP loopback transfer between two processes,
                               ``recv_into`` a preallocated buffer; and redis-py
                               (hiredis) GET / SET against a local redis-server
lookup, 64 asyncio clients     none: p50 and p99 latency, and errors
=============================  ====================================================

Throughput ratios are kvstore / baseline (higher is better). All transfers
run interleaved round by round, so each sees the same background load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kvstore.benchmarks.service_soak import SoakConfig, add_soak_arguments, run_soak
from kvstore.benchmarks.common import (
    Case,
    Report,
    Timing,
    add_common_arguments,
    finish,
    measure_interleaved,
    percentile,
    positive_float,
    positive_int,
    quick_default,
    redis_url_or_local,
    say,
)
from kvstore.buffers import U8
from kvstore.client import AsyncClient, Client
from kvstore.keys import ChunkKey, Namespace, prefix_keys
from kvstore.spec import KVSpec, ModelFingerprint

LLAMA3_8B = KVSpec(ModelFingerprint("meta-llama/Meta-Llama-3-8B"), 32, 8, 128)
BENCH_NS = Namespace("kvstore-bench", LLAMA3_8B)
LOOKUP_NS = Namespace("kvstore-bench-lookup", LLAMA3_8B)
MIB = 1 << 20
SECTIONS = ("shm", "tcp", "socket", "redis", "lookup")


@dataclass(frozen=True, slots=True)
class ServiceBenchConfig:
    """What one run measures.

    Attributes:
        chunks: distinct chunks of random bytes; timed runs cycle through them.
        chunk_bytes: size of each chunk.
        iters: timed runs per transfer (the median is reported).
        warmup: untimed runs before them.
        clients: concurrent asyncio clients of the lookup measurement.
        lookups: lookups per client.
        prompt_tokens: tokens per lookup (all of its full chunks cached).
        redis_url: Redis to use; None starts a private redis-server when one is on PATH.
        skip: sections (of SECTIONS) not to run.
        seed: seed of the random bytes.
    """

    chunks: int = 4
    chunk_bytes: int = BENCH_NS.chunk_nbytes
    iters: int = 10
    warmup: int = 2
    clients: int = 64
    lookups: int = 50
    prompt_tokens: int = 4096
    redis_url: str | None = None
    skip: frozenset[str] = frozenset()
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("chunks", "chunk_bytes", "iters", "clients", "lookups", "prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")
        if unknown := self.skip - set(SECTIONS):
            raise ValueError(f"unknown sections {sorted(unknown)}; known: {SECTIONS}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServiceBenchConfig:
        q = bool(args.quick)
        return cls(
            chunks=quick_default(args.chunks, 4, 2, q),
            chunk_bytes=int(quick_default(args.chunk_mib, 32.0, 1.0, q) * MIB),
            iters=quick_default(args.iters, 10, 3, q),
            warmup=quick_default(args.warmup, 2, 1, q),
            clients=quick_default(args.clients, 64, 8, q),
            lookups=quick_default(args.lookups, 50, 10, q),
            prompt_tokens=args.prompt_tokens,
            redis_url=args.redis_url,
            skip=frozenset(args.skip or ()),
            seed=args.seed,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``kvstore bench service``."""
    add_common_arguments(parser, iters=10, warmup=2, quick_iters=3, quick_warmup=1)
    parser.add_argument("--chunks", type=positive_int, help="distinct chunks (default 4; --quick 2)")
    parser.add_argument("--chunk-mib", type=positive_float, help="MiB per chunk (default 32; --quick 1)")
    parser.add_argument("--clients", type=positive_int, help="concurrent lookup clients (default 64; --quick 8)")
    parser.add_argument("--lookups", type=positive_int, help="lookups per client (default 50; --quick 10)")
    parser.add_argument("--prompt-tokens", type=positive_int, default=4096, help="tokens per lookup (default 4096)")
    parser.add_argument("--redis-url", default=None, help="Redis to compare with (default: a private redis-server)")
    parser.add_argument("--skip", action="append", choices=SECTIONS, help="leave a section out (repeatable)")
    add_soak_arguments(parser)


# -- processes this benchmark starts -------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Daemon:
    port: int
    unix_path: str


@contextlib.contextmanager
def dataplane_process(workdir: str, cpu_bytes: int) -> Iterator[Daemon]:
    """A data-plane server in its own process (``kvstore.service.dataplane_main``); stopped on exit."""
    sock = os.path.join(workdir, "kvstore.sock")
    argv = [sys.executable, "-m", "kvstore.service.dataplane_main", "--port", "0", "--unix-path", sock,
            "--cpu-bytes", str(cpu_bytes)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None  # stdout=PIPE
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the data-plane process exited with {proc.wait()} before it listened")
        info = json.loads(line)
        yield Daemon(int(info["port"]), sock)
    finally:
        _stop(proc)


_PEER = """
import socket, sys
import numpy as np
import numpy.typing as npt
n = int(sys.argv[1]); srv = socket.create_server(("127.0.0.1", 0)); print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept(); conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8); view = buf.data
while (cmd := conn.recv(1)):
    if cmd == b"g":
        conn.sendall(view)
    else:
        got = 0
        while got < n:
            got += conn.recv_into(view[got:])
        conn.sendall(b"k")
"""


class RawSocketPeer:
    """The baseline: another process that sends (``g``) or receives (``p``) ``n`` raw bytes over TCP loopback."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.proc = subprocess.Popen([sys.executable, "-c", _PEER, str(n)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None  # stdout=PIPE
        port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get(self, out: U8) -> None:
        self.sock.sendall(b"g")
        view, got = out.data, 0
        while got < self.n:
            got += self.sock.recv_into(view[got:])

    def put(self, src: U8) -> None:
        self.sock.sendall(b"p")
        self.sock.sendall(src.data)
        if self.sock.recv(1) != b"k":
            raise RuntimeError("raw-socket peer did not acknowledge")

    def close(self) -> None:
        self.sock.close()
        _stop(self.proc)


def _short_tempdir() -> str:
    """A private temporary directory whose path leaves room for a Unix socket name (~100 bytes at most)."""
    workdir = tempfile.mkdtemp(prefix="kvsb-")
    if len(workdir) > 80:
        os.rmdir(workdir)
        workdir = tempfile.mkdtemp(prefix="kvsb-", dir="/tmp")
    return workdir


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


# -- transfers -----------------------------------------------------------------------------
def transfer_cases(cfg: ServiceBenchConfig, daemon: Daemon, redis_url: str | None, stack: contextlib.ExitStack,
                   chunks: list[U8], out: U8) -> dict[str, Case]:
    """Every interleaved transfer: memcpy, raw socket, redis-py, kvstore over shm and TCP."""
    keys = [ChunkKey(bytes([i]) * 32) for i in range(len(chunks))]
    k = len(chunks)
    cases: dict[str, Case] = {"memcpy": Case(lambda i: np.copyto(out, chunks[i % k]))}
    if "socket" not in cfg.skip:
        peer = RawSocketPeer(cfg.chunk_bytes)
        stack.callback(peer.close)
        cases["socket_get"] = Case(lambda i: peer.get(out))
        cases["socket_put"] = Case(lambda i: peer.put(chunks[i % k]))
    if redis_url is not None and "redis" not in cfg.skip:
        import redis

        r = redis.Redis.from_url(redis_url)
        stack.callback(r.close)
        for i, c in enumerate(chunks):
            r.set(b"kvstore-bench-%d" % i, c.data)
        stack.callback(lambda: r.delete(*(b"kvstore-bench-%d" % i for i in range(k))))
        cases["redispy_get"] = Case(lambda i: r.get(b"kvstore-bench-%d" % (i % k)))
        cases["redispy_set"] = Case(lambda i: r.set(b"kvstore-bench-set", chunks[i % k].data))
    for name, url in (("shm", f"unix://{daemon.unix_path}"), ("tcp", f"kvstore://127.0.0.1:{daemon.port}")):
        if name in cfg.skip:
            continue
        cases.update(_client_cases(name, Client.connect(url, pool_size=1, timeout_s=120), stack, keys, chunks, out))
    return cases


def _client_cases(name: str, kv: Client, stack: contextlib.ExitStack, keys: list[ChunkKey], chunks: list[U8],
                  out: U8) -> dict[str, Case]:
    stack.callback(kv.close)
    ns = kv.register(BENCH_NS)
    if name == "shm" and kv.info.shm_path is None:
        raise RuntimeError("the daemon did not offer shared memory on its Unix socket")
    k = len(chunks)
    put_key = ChunkKey(b"\xff" * 32)
    kv.put_many(ns, keys, chunks)

    def get(i: int) -> None:
        if kv.get(ns, keys[i % k], out) != out.size:
            raise RuntimeError(f"{name} get missed")

    def put(i: int) -> None:
        if not kv.put(ns, put_key, chunks[i % k]):
            raise RuntimeError(f"{name} put was refused")

    return {f"{name}_get": Case(get), f"{name}_put": Case(put, teardown=lambda i: kv.delete(ns, put_key) and None)}


def report_transfers(report: Report, timings: dict[str, Timing], nbytes: int) -> None:
    pairs = [
        ("shm get vs memcpy", "shm_get_vs_memcpy", "shm_get", "memcpy"),
        ("shm put vs memcpy", "shm_put_vs_memcpy", "shm_put", "memcpy"),
        ("TCP get vs raw socket", "tcp_get_vs_socket", "tcp_get", "socket_get"),
        ("TCP put vs raw socket", "tcp_put_vs_socket", "tcp_put", "socket_put"),
        ("TCP get vs redis-py GET", "tcp_get_vs_redis", "tcp_get", "redispy_get"),
        ("TCP put vs redis-py SET", "tcp_put_vs_redis", "tcp_put", "redispy_set"),
    ]
    for label, key, ours, base in pairs:
        if ours in timings and base in timings:
            report.compare_rates(label, key, timings, ours, base, nbytes)


# -- lookups -------------------------------------------------------------------------------
async def lookup_latencies(url: str, clients: int, lookups: int, tokens: npt.NDArray[np.uint32]) -> tuple[list[float], int]:
    """Latency of every lookup of ``clients`` concurrent clients; and how many failed."""
    kvs = [await AsyncClient.connect(url, pool_size=1) for _ in range(clients)]
    samples: list[float] = []
    errors = 0

    async def one(kv: AsyncClient) -> None:
        nonlocal errors
        for _ in range(lookups):
            t0 = time.perf_counter()
            try:
                hit = await kv.lookup(LOOKUP_NS, tokens, lease=False)
                if hit.hit_tokens != len(tokens) // LOOKUP_NS.chunk_tokens * LOOKUP_NS.chunk_tokens:
                    errors += 1
            except Exception:  # noqa: BLE001
                errors += 1
            samples.append(time.perf_counter() - t0)

    try:
        await asyncio.gather(*(kv.ping() for kv in kvs))  # every connection is open before timing
        await asyncio.gather(*(one(kv) for kv in kvs))
    finally:
        for kv in kvs:
            await kv.close()
    return samples, errors


def measure_lookups(cfg: ServiceBenchConfig, daemon: Daemon, report: Report) -> None:
    tokens = np.arange(cfg.prompt_tokens, dtype=np.uint32)
    url = f"kvstore://127.0.0.1:{daemon.port}"
    with Client.connect(url) as kv:
        ns = kv.register(LOOKUP_NS)
        keys = prefix_keys(ns, tokens)
        kv.put_many(ns, keys, [np.zeros(64, dtype=np.uint8)] * len(keys))  # tiny placeholders: only keys matter
    samples, errors = asyncio.run(lookup_latencies(url, cfg.clients, cfg.lookups, tokens))
    p50, p99 = percentile(samples, 50.0), percentile(samples, 99.0)
    report.record("lookup_clients", cfg.clients)
    report.record("lookup_chunks", len(keys))
    report.record("lookup_errors", errors)
    report.record("lookup_p50_ms", round(p50 * 1e3, 4))
    report.record("lookup_p99_ms", round(p99 * 1e3, 4))
    report.record("lookup_p99_over_p50", round(p99 / p50, 3))
    report.row(f"lookup, {cfg.clients} asyncio clients", f"p50 {p50 * 1e3:.3f} ms", f"p99 {p99 * 1e3:.3f} ms",
               f"{p99 / p50:.2f}x", "lookup_p99_over_p50")
    say(f"{'lookup p50 / p99 (' + str(cfg.clients) + ' clients)':<40} {p50 * 1e3:9.3f} ms  {p99 * 1e3:9.3f} ms  "
        f"errors {errors}")


# -- the run -------------------------------------------------------------------------------
def run_config(cfg: ServiceBenchConfig) -> Report:
    report = Report()
    report.record("chunk_bytes", cfg.chunk_bytes)
    rng = np.random.default_rng(cfg.seed)
    chunks = [rng.integers(0, 256, cfg.chunk_bytes, dtype=np.uint8) for _ in range(cfg.chunks)]
    out = np.zeros(cfg.chunk_bytes, dtype=np.uint8)
    arena = (cfg.chunks + 2) * cfg.chunk_bytes + 64 * MIB
    workdir = _short_tempdir()
    try:
        with dataplane_process(workdir, arena) as daemon, redis_url_or_local(cfg.redis_url) as redis_url, \
                contextlib.ExitStack() as stack:
            if redis_url is None and "redis" not in cfg.skip:
                report.note("redis-server is not on PATH: the redis-py comparison was skipped")
            cases = transfer_cases(cfg, daemon, redis_url, stack, chunks, out)
            timings = measure_interleaved(cases, iters=cfg.iters, warmup=cfg.warmup)
            report_transfers(report, timings, cfg.chunk_bytes)
            stack.close()
            if "lookup" not in cfg.skip:
                measure_lookups(cfg, daemon, report)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the flags describe; 0 on success (for ``--soak``: every check passed)."""
    if args.soak:
        report, passed = run_soak(SoakConfig.from_args(args), show_progress=not args.no_progress)
        finish(report, bool(args.json))
        return 0 if passed else 1
    report = run_config(ServiceBenchConfig.from_args(args))
    finish(report, bool(args.json))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvstore bench service", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
