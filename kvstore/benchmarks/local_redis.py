"""A throwaway redis-server for the benchmarks: private, on a free loopback port, no persistence."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass


@contextlib.contextmanager
def redis_url_or_local(url: str | None) -> Iterator[str | None]:
    """``url`` if given, else a private redis-server's URL (stopped on exit), else None (none on PATH)."""
    if url is not None:
        yield url
    elif shutil.which("redis-server") is None:
        yield None
    else:
        with local_redis() as server:
            yield server.url


@dataclass(frozen=True, slots=True)
class LocalRedis:
    """A redis-server this process started on loopback; gone when its context exits."""

    url: str
    port: int
    pid: int


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller retries on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_redis(executable: str = "redis-server", start_timeout_s: float = 10.0) -> Iterator[LocalRedis]:
    """Start a private redis-server on a free loopback port, without persistence.

    The server runs in a temporary directory and is stopped (and the
    directory removed) when the context exits, also on errors.

    Raises:
        FileNotFoundError: ``executable`` is not on PATH.
        RuntimeError: the server did not answer PING within ``start_timeout_s``.
    """
    path = shutil.which(executable)
    if path is None:
        raise FileNotFoundError(f"{executable} is not on PATH")
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-redis-") as workdir:
        for _attempt in range(5):
            port = free_port()
            proc = _spawn_redis(path, port, workdir)
            try:
                if _wait_for_ping(proc, port, start_timeout_s):
                    yield LocalRedis(f"redis://127.0.0.1:{port}", port, proc.pid)
                    return
            finally:
                _stop(proc)
        raise RuntimeError(f"{executable} did not start (5 attempts); see its log in {workdir}")


def _spawn_redis(path: str, port: int, workdir: str) -> subprocess.Popen[bytes]:
    args = [path, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", workdir, "--logfile", os.path.join(workdir, "redis.log"), "--daemonize", "no"]
    return subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _wait_for_ping(proc: subprocess.Popen[bytes], port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False  # exited: most likely the port was taken meanwhile
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return True
        time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
