"""A real ``kvstore serve`` daemon for a benchmark: a subprocess on free loopback ports, TCP only.

The daemon runs without a disk tier and without a Unix socket, so every
chunk a client reads crosses the loopback TCP data plane. Its log goes to a
file in the benchmark's temporary directory and is quoted if it fails to start.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from kvstore.benchmarks.common import free_port
from kvstore.client import Client

START_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class Served:
    """A running daemon: its data-plane URL and admin port."""

    url: str
    admin_port: int


@contextlib.contextmanager
def serve_process(workdir: str, cpu_bytes: int) -> Iterator[Served]:
    """Run ``kvstore serve`` (CPU tier of ``cpu_bytes``, TCP data plane) until the block ends.

    Raises:
        RuntimeError: the daemon exited or did not answer within START_TIMEOUT_S (with its log).
    """
    port, admin = free_port(), free_port()
    log_path = os.path.join(workdir, "kvstore-serve.log")
    argv = [sys.executable, "-m", "kvstore.cli", "serve", "--port", str(port), "--admin-port", str(admin),
            "--no-disk", "--unix-path", "", "--cpu-bytes", str(cpu_bytes), "--log-level", "warning",
            "--no-access-log"]  # fmt: skip
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=workdir)
    try:
        url = f"kvstore://127.0.0.1:{port}"
        _wait_ready(proc, url, log_path)
        yield Served(url, admin)
    finally:
        _stop(proc)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log_path: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kvstore serve exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            Client.connect(url, retries=0, timeout_s=5).close()
            return
        except OSError:  # RemoteUnavailable is one: not listening yet
            time.sleep(0.1)
    raise RuntimeError(f"kvstore serve did not answer in {START_TIMEOUT_S} s:\n{_tail(log_path)}")


def _tail(path: str, nbytes: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            return f.read()[-nbytes:].decode(errors="replace")
    except OSError:
        return ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
