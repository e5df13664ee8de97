"""Real redis-server processes for tests: one standalone server or a 3-node Cluster.

Each server listens on 127.0.0.1 on a free port (and on a unix socket) from
its own temporary directory, with persistence off. The helper that starts a
process owns it: ``close()`` kills it and removes its directory, and an
``atexit`` hook kills whatever a crashed test run left behind.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0

_LIVE: set[subprocess.Popen[bytes]] = set()


def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _LIVE.clear()


atexit.register(_kill_leftovers)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port(*, cluster_bus: bool = False) -> int:
    """A loopback TCP port nobody listens on; with ``cluster_bus`` also port + 10000."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port: int = s.getsockname()[1]
        if not cluster_bus:
            return port
        if port + 10000 <= 65535 and _port_free(port + 10000):
            return port
    raise RuntimeError("no free loopback port found")


class RedisServer:
    """One redis-server process on 127.0.0.1:``port`` (and ``unix_path``).

    The port stays fixed across :meth:`kill`/:meth:`restart`, so a client can
    watch the same address go down and come back. Data is not persisted: a
    restarted server is empty.
    """

    def __init__(self, port: int | None = None, *, cluster: bool = False, extra_args: tuple[str, ...] = ()):
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not on PATH")
        self.cluster = cluster
        self.port = port if port is not None else free_port(cluster_bus=cluster)
        self.dir = Path(tempfile.mkdtemp(prefix="kvs-redis-"))
        self.unix_path = str(self.dir / "redis.sock")
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.unix_path}?db=0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, **kwargs: object) -> redis.Redis:
        """A plain redis-py client to inspect or tamper with the server's data."""
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5, **kwargs)  # type: ignore[arg-type]

    def _argv(self) -> list[str]:
        argv = [
            str(REDIS_SERVER), "--port", str(self.port), "--bind", HOST, "--dir", str(self.dir),
            "--save", "", "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no",
            "--unixsocket", self.unix_path, "--unixsocketperm", "700",
            "--logfile", str(self.dir / "redis.log"),
        ]
        if self.cluster:
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000"]
        return argv + list(self.extra_args)

    def start(self) -> RedisServer:
        """Start the process and wait until it answers PING.

        Raises:
            RuntimeError: it exited or did not answer within START_TIMEOUT_S.
        """
        if self.running:
            return self
        self.proc = subprocess.Popen(self._argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _LIVE.add(self.proc)
        deadline = time.monotonic() + START_TIMEOUT_S
        probe = redis.Redis(host=HOST, port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log_tail()}")
                try:
                    if probe.ping():
                        return self
                except redis.exceptions.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"redis-server on port {self.port} did not start: {self.log_tail()}")
                time.sleep(0.02)
        finally:
            probe.close()

    def log_tail(self, nbytes: int = 2000) -> str:
        try:
            return (self.dir / "redis.log").read_text(errors="replace")[-nbytes:]
        except OSError:
            return ""

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-conversation, like a crashed host."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        _LIVE.discard(self.proc)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after 5 s)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _LIVE.discard(self.proc)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (clients time out)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(self) -> RedisServer:
        """Kill (if running) and start again on the same port, empty."""
        self.resume()
        self.kill()
        return self.start()

    def close(self) -> None:
        """Kill the process and remove its directory; idempotent."""
        self.resume()
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisClusterNodes:
    """A Redis Cluster of ``size`` primaries (no replicas) on loopback ports."""

    def __init__(self, size: int = 3):
        if REDIS_CLI is None:
            raise RuntimeError("redis-cli is not on PATH")
        self.nodes = [RedisServer(cluster=True) for _ in range(size)]

    @property
    def url(self) -> str:
        """URL of one node; a cluster client discovers the others."""
        return self.nodes[0].url

    def start(self) -> RedisClusterNodes:
        """Start every node, assign all slots with redis-cli, wait for cluster_state:ok.

        Raises:
            RuntimeError: a node did not start or the cluster did not become ok.
        """
        try:
            for node in self.nodes:
                node.start()
            addrs = [f"{HOST}:{node.port}" for node in self.nodes]
            subprocess.run(
                [str(REDIS_CLI), "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
            )
            self._wait_ok()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            states = []
            for node in self.nodes:
                with node.client() as c:
                    info = c.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                states.append("cluster_state:ok" in text)
            if all(states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    def flushall(self) -> None:
        for node in self.nodes:
            with node.client() as c:
                c.flushall()

    def close(self) -> None:
        for node in self.nodes:
            node.close()
