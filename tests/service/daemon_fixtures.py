"""The daemon as a real subprocess on free ports, and a small HTTP client for its admin API.

``DaemonProc`` runs ``python -m kvstore.cli serve`` with its log (JSON lines
on stderr) in a file, waits until ``/healthz`` answers, and stops it with a
signal. ``Reply``/``call`` (kvstore.benchmarks.netlab.call_host) speak plain HTTP so tests
control headers and bodies exactly (bearer tokens, oversized or slow bodies).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from kvstore.benchmarks.netlab import HttpReply, call_host
from kvstore.keys import Namespace, prefix_keys
from kvstore.spec import KVSpec, ModelFingerprint
from tests.redis_servers import free_port

HAVE_DATAPLANE = importlib.util.find_spec("kvstore.service.dataplane") is not None
START_TIMEOUT_S = 60.0
SPEC = {
    "model": "m",
    "num_layers": 2,
    "num_kv_heads": 2,
    "head_dim": 8,
    "dtype": "float16",
    "chunk_tokens": 16,
}
ADMIN_TOKEN = "admin-token-000000000000"
TOKENS = {"tenant-a-token-0000000000": "tenant-a", "tenant-b-token-0000000000": "tenant-b", ADMIN_TOKEN: "*"}
TOKEN_A, TOKEN_B = "tenant-a-token-0000000000", "tenant-b-token-0000000000"


def namespace(tenant: str) -> Namespace:
    """The namespace ``SPEC`` registers for ``tenant``."""
    return Namespace(tenant, KVSpec(ModelFingerprint("m"), 2, 2, 8, "float16"), chunk_tokens=16)


def chunk_bytes(seed: int, nbytes: int = 2048) -> bytes:
    return bytes((seed * 7919 + i * 31) % 251 for i in range(nbytes))


#: One HTTP reply (status, lower-case headers, body; ``json()`` refuses anything but an object).
Reply = HttpReply
Body = bytes | Mapping[str, Any] | list[Any] | None


def call(
    port: int,
    method: str,
    path: str,
    body: Body = None,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> Reply:
    """One request to 127.0.0.1:``port``; a dict/list body is sent as JSON."""
    return call_host("127.0.0.1", port, method, path, body, token, headers, timeout)


class DaemonProc:
    """``kvstore serve`` in a subprocess: admin API and data plane on free loopback ports."""

    def __init__(
        self,
        workdir: Path,
        *,
        data_dir: Path | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        tokens: Mapping[str, str] | None = None,
        data_plane: bool = HAVE_DATAPLANE,
        name: str = "daemon",
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir or workdir / "data"
        self.admin_port = free_port()
        self.port = free_port()
        self.log_path = workdir / f"{name}-{self.admin_port}.log"
        self.data_plane = data_plane
        argv = [
            sys.executable,
            "-m",
            "kvstore.cli",
            "serve",
            "--admin-port",
            str(self.admin_port),
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--cpu-bytes",
            "16MiB",
            "--disk-bytes",
            "64MiB",
            "--history-interval-s",
            "1",
            "--data-plane" if data_plane else "--no-data-plane",
            *args,
        ]
        if tokens:
            path = workdir / f"tokens-{self.admin_port}"
            path.write_text("".join(f"{t} {tenant}\n" for t, tenant in tokens.items()))
            path.chmod(0o600)
            argv += ["--tokens-file", str(path)]
        self.argv = argv
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProc:
        """Start and wait for /healthz (and the data plane in /readyz when it is on).

        Raises:
            RuntimeError: the process exited or did not answer in time (with its log).
        """
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log, env=self.env, cwd=self.workdir)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if call(self.admin_port, "GET", "/healthz", timeout=2).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"daemon did not start in {START_TIMEOUT_S} s:\n{self.log_text()}")

    def call(
        self,
        method: str,
        path: str,
        body: Body = None,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> Reply:
        return call(self.admin_port, method, path, body, token, headers, timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the daemon and wait; returns its exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit (after a signal sent earlier); returns its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_records(self) -> list[dict[str, object]]:
        """Every log line parsed as JSON (a line that is not JSON fails the test)."""
        return [json.loads(line) for line in self.log_text().splitlines() if line.strip()]

    def register(self, tenant: str, token: str | None = None) -> Namespace:
        reply = self.call("POST", "/v1/namespaces", {**SPEC, "tenant": tenant}, token)
        assert reply.status == 200, reply
        ns = namespace(tenant)
        assert reply.json()["namespace"] == ns.id.hex()
        return ns

    def put_chunks(
        self, ns: Namespace, tokens: Sequence[int], token: str | None = None, seed: int = 0
    ) -> list[str]:
        """Store every full chunk of ``tokens`` through the admin API; returns their hex keys."""
        keys = [k.hex() for k in prefix_keys(ns, list(tokens))]
        for i, key in enumerate(keys):
            reply = self.call("PUT", f"/v1/chunks/{ns.id.hex()}/{key}", chunk_bytes(seed + i), token)
            assert reply.status == 201, reply
        return keys

    def wait_idle(self, token: str | None = None, timeout: float = 10.0) -> Any:
        """Wait until the background writer's queue is empty; returns the last /v1/stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.call("GET", "/v1/stats", token=token).json()
            writer = stats["writer"]
            assert isinstance(writer, dict)
            if (
                writer["depth"] == 0
                and writer["written"] + writer["dropped"] + writer["failed"] >= writer["queued"]
            ):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"background writes did not finish: {writer}")
            time.sleep(0.05)


def running(daemon: DaemonProc) -> Iterator[DaemonProc]:
    """Start ``daemon``, yield it, and always stop it (SIGKILL if SIGTERM is not enough)."""
    daemon.start()
    try:
        yield daemon
    finally:
        try:
            daemon.stop()
        finally:
            daemon.kill()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, or None if absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        metric, _, value = line.rpartition(" ")
        base, _, rest = metric.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if base == name and got == want:
            return float(value)
    return None
