"""Data-plane servers as real processes, and a raw-frame connection for protocol tests.

``python -m kvstore.service.dataplane_main --port 0`` prints its port as JSON
once it listens; the fixtures start it with a Unix socket in a short private
directory (socket paths are limited to ~100 bytes), and stop it (SIGTERM,
then SIGKILL) after the test. :class:`RawConn` speaks the wire protocol with
plain blocking sockets, so tests can send anything, malformed frames included.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from kvstore.service.protocol import PREFIX_BYTES, MsgType, Prefix, decode_header, frame, unpack_prefix

START_TIMEOUT_S = 30.0


@dataclass
class DataPlaneProcess:
    """A running ``dataplane_main`` process."""

    proc: subprocess.Popen[str]
    port: int
    unix_path: str
    shm_path: str | None
    workdir: str
    args: tuple[str, ...] = field(default=())

    @property
    def tcp_url(self) -> str:
        return f"kvstore://127.0.0.1:{self.port}"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.unix_path}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop the process (and remove its directory); its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return int(self.proc.returncode)


def start_dataplane(*args: str, cpu_bytes: str = "64MiB", unix_path: str | None = None) -> DataPlaneProcess:
    """Start a data-plane process on a free port (extra ``args`` go to dataplane_main)."""
    workdir = tempfile.mkdtemp(prefix="kvs-", dir="/tmp")
    sock = unix_path or os.path.join(workdir, "dp.sock")
    argv = [
        sys.executable,
        "-m",
        "kvstore.service.dataplane_main",
        "--port",
        "0",
        "--unix-path",
        sock,
        "--cpu-bytes",
        cpu_bytes,
        *args,
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)
        raise RuntimeError(f"dataplane_main did not start (exit {proc.wait()})")
    info = json.loads(line)
    return DataPlaneProcess(proc, int(info["port"]), sock, info.get("shm_path"), workdir, tuple(args))


@pytest.fixture
def dataplane() -> Iterator[DataPlaneProcess]:
    """A fresh data-plane process (64 MiB CPU tier in /dev/shm, no auth) for one test."""
    dp = start_dataplane()
    try:
        yield dp
    finally:
        dp.stop()


@pytest.fixture
def dataplane_factory() -> Iterator[Callable[..., DataPlaneProcess]]:
    """Starts data-plane processes with chosen flags; all are stopped after the test."""
    started: list[DataPlaneProcess] = []

    def make(*args: str, **kwargs: Any) -> DataPlaneProcess:
        dp = start_dataplane(*args, **kwargs)
        started.append(dp)
        return dp

    try:
        yield make
    finally:
        for dp in started:
            dp.stop()


class RawConn:
    """A blocking socket speaking raw frames: send anything, read replies one by one."""

    def __init__(self, dp: DataPlaneProcess, unix: bool = False, timeout_s: float = 20.0) -> None:
        if unix:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(dp.unix_path)
        else:
            self.sock = socket.create_connection(("127.0.0.1", dp.port))
        self.sock.settimeout(timeout_s)
        self._rid = 0

    def send(self, data: bytes | memoryview) -> None:
        self.sock.sendall(data)

    def send_request(self, mt: int, header: dict[str, Any], payload: bytes = b"") -> int:
        self._rid += 1
        self.send(frame(mt, self._rid, header, len(payload)) + payload)
        return self._rid

    def request(
        self, mt: int, header: dict[str, Any], payload: bytes = b""
    ) -> tuple[Prefix, dict[str, Any], bytes]:
        rid = self.send_request(mt, header, payload)
        prefix, reply, body = self.read()
        assert prefix.request_id == rid
        return prefix, reply, body

    def ok(self, mt: int, header: dict[str, Any], payload: bytes = b"") -> dict[str, Any]:
        """A request that must succeed; its reply header."""
        prefix, reply, _ = self.request(mt, header, payload)
        assert prefix.type in (MsgType.OK, MsgType.HELLO_OK), reply
        return reply

    def read(self) -> tuple[Prefix, dict[str, Any], bytes]:
        prefix = unpack_prefix(self.recv_exact(PREFIX_BYTES), 1 << 40)
        header = decode_header(self.recv_exact(prefix.header_len))
        return prefix, header, self.recv_exact(prefix.payload_len)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionError(f"closed after {got} of {n} bytes")
            got += k
        return bytes(buf)

    def closed_by_peer(self) -> bool:
        """True once the daemon has closed this connection (EOF or reset)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
