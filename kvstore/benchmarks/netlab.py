"""Network emulation: network namespaces joined by shaped veth links, plus a delaying relay.

Topology made by :class:`NetLab` (names unique per lab, everything removed by
:meth:`NetLab.close`)::

    node "a" (netns) eth0 10.R.S.1 --veth--+
                                           +-- bridge in the lab's hub netns
    node "b" (netns) eth0 10.R.S.2 --veth--+
    each node: mgmt0 <--veth--> the lab maker's own (root) namespace, unshaped

The data links are shaped with ``tc tbf`` on both ends (so each direction of
each node's link carries at most ``rate``); :meth:`NetLab.set_rate` changes
the rate in place (``tc qdisc change``), also in the middle of a transfer.
The kernel has no ``netem``: round-trip delay comes from
:class:`kvstore.benchmarks.relay.DelayRelay`, started inside a node with
:meth:`NetLab.start_relay`. The management links let the process that made the lab (and a Redis
server it runs) reach every node without crossing the shaped links.

Needs root (``ip netns``, ``tc``); :func:`unavailable_reason` says why a lab
cannot be made here. Used by ``kvstore bench migrate`` and the migration tests.

    with NetLab(("a", "b"), rate="100mbit") as lab:
        lab.popen("a", [sys.executable, "-m", ...])
        lab.set_rate("50mbit")

Tools for checking a lab (run inside a node)::

    python -m kvstore.benchmarks.netlab sink --port 9000
    python -m kvstore.benchmarks.netlab send --host 10.R.S.1 --port 9000 --seconds 3
    python -m kvstore.benchmarks.netlab echo --port 9001
    python -m kvstore.benchmarks.netlab ping --host ... --port 9001 --count 20
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the folder holding the ``kvstore`` package (on PYTHONPATH of processes started in a node)
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
CROSS_DC = "1gbit"
CONGESTED = "100mbit"
GSO_MAX = 32 << 10


def rate_bps(rate: str) -> float:
    """``"100mbit"`` -> 1e8 (tc's decimal units).

    Raises:
        ValueError: not ``<number>(bit|kbit|mbit|gbit)``.
    """
    m = _RATE.match(rate.strip().lower())
    if m is None:
        raise ValueError(f"a rate is <number>(bit|kbit|mbit|gbit), got {rate!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (None: they can): no ``ip``/``tc``, or the kernel refuses."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "the ip and tc commands (iproute2) are not installed"
    probe = f"kvlab-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"the kernel or permissions refuse network namespaces: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _sh(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


@dataclass(frozen=True, slots=True)
class Node:
    """One node of a lab.

    Attributes:
        name: the lab's name for it (``"a"``).
        netns: the network namespace's name.
        ip: its address on the shaped data network.
        mgmt_ip: its address on its management link.
        host_ip: the lab maker's address on that management link (reachable from the node).
    """

    name: str
    netns: str
    ip: str
    mgmt_ip: str
    host_ip: str


class NetLab:
    """Namespaces joined by shaped links (see the module docstring); a context manager.

    Invariant: every namespace and root-side interface it made is recorded
    before use and removed by :meth:`close` (idempotent), even after a failed
    :meth:`create`.
    """

    def __init__(self, nodes: Sequence[str] = ("a", "b"), rate: str | None = CROSS_DC) -> None:
        if len(set(nodes)) != len(nodes) or not nodes:
            raise ValueError("node names must be unique and at least one")
        self.lab_id = uuid.uuid4().hex[:6]
        self.names = tuple(nodes)
        self.rate = rate
        self.nodes: dict[str, Node] = {}
        self._netns: list[str] = []
        self._root_links: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self.hub = f"kvlab-{self.lab_id}-hub"

    def __enter__(self) -> NetLab:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def node(self, name: str) -> Node:
        return self.nodes[name]

    # -- building -------------------------------------------------------------------------
    def create(self) -> NetLab:
        """Make the namespaces, links and shaping.

        Raises:
            RuntimeError: an ``ip``/``tc`` command failed (everything made so far is removed).
        """
        try:
            r, s = self._subnet()
            self._add_netns(self.hub)
            _sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
            _sh("ip", "-n", self.hub, "link", "set", "br0", "up")
            _sh("ip", "-n", self.hub, "link", "set", "lo", "up")
            for i, name in enumerate(self.names):
                self.nodes[name] = self._add_node(i, name, r, s)
        except BaseException:
            self.close()
            raise
        return self

    def _subnet(self) -> tuple[int, int]:
        routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
        for _ in range(100):
            r, s = random.randint(100, 199), random.randrange(0, 250, 2)
            if f"10.{r}.{s}." not in routes and f"10.{r}.{s + 1}." not in routes:
                return r, s
        raise RuntimeError("no free 10.x.y.0/23 for the lab")

    def _add_netns(self, name: str) -> None:
        _sh("ip", "netns", "add", name)
        self._netns.append(name)

    def _add_node(self, i: int, name: str, r: int, s: int) -> Node:
        ns = f"kvlab-{self.lab_id}-{name}"[:48]
        self._add_netns(ns)
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        # data link: eth0 in the node, h<i> on the hub's bridge
        _sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"h{i}", "netns", self.hub)
        _sh("ip", "-n", self.hub, "link", "set", f"h{i}", "master", "br0", "up")
        ip = f"10.{r}.{s}.{i + 1}"
        _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        # management link to the root namespace
        root_if = f"kvm{self.lab_id}{i}"
        _sh("ip", "link", "add", root_if, "type", "veth", "peer", "name", "mgmt0", "netns", ns)
        self._root_links.append(root_if)
        host_ip, mgmt_ip = f"10.{r}.{s + 1}.{4 * i + 1}", f"10.{r}.{s + 1}.{4 * i + 2}"
        _sh("ip", "addr", "add", f"{host_ip}/30", "dev", root_if)
        _sh("ip", "link", "set", root_if, "up")
        _sh("ip", "-n", ns, "addr", "add", f"{mgmt_ip}/30", "dev", "mgmt0")
        _sh("ip", "-n", ns, "link", "set", "mgmt0", "up")
        node = Node(name, ns, ip, mgmt_ip, host_ip)
        for netns, dev in self._shaped(node, i):
            # every packet stays below tbf's smallest burst, also for a rate lowered while it waits
            _sh("ip", "-n", netns, "link", "set", "dev", dev, "gso_max_size", str(GSO_MAX))
        if self.rate is not None:
            for netns, dev in self._shaped(node, i):
                _sh("tc", "-n", netns, "qdisc", "add", "dev", dev, "root", "tbf", *_tbf(self.rate))
        return node

    def _shaped(self, node: Node, i: int) -> list[tuple[str, str]]:
        return [(node.netns, "eth0"), (self.hub, f"h{i}")]

    def set_rate(self, rate: str, nodes: Sequence[str] | None = None) -> None:
        """Change the data links' rate now (``tc qdisc change``; ``replace`` where none was set)."""
        verb = "change" if self.rate is not None else "replace"
        for i, name in enumerate(self.names):
            if nodes is not None and name not in nodes:
                continue
            for netns, dev in self._shaped(self.nodes[name], i):
                _sh("tc", "-n", netns, "qdisc", verb, "dev", dev, "root", "tbf", *_tbf(rate))
        if nodes is None:
            self.rate = rate

    # -- processes ------------------------------------------------------------------------
    def popen(self, node: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``node``'s namespace (killed by :meth:`close` if still running)."""
        path = os.pathsep.join(x for x in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if x)
        full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
        proc = subprocess.Popen(["ip", "netns", "exec", self.nodes[node].netns, *argv], env=full_env,
                                cwd=kwargs.pop("cwd", None), **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, node: str, argv: Sequence[str], timeout: float = 60.0) -> str:
        """Run ``argv`` inside ``node`` to completion; its stdout.

        Raises:
            RuntimeError: it failed (with its stderr).
        """
        proc = self.popen(node, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv} in {node} exited {proc.returncode}: {err.decode(errors='replace')}")
        return out.decode()

    def start_relay(self, node: str, listen: tuple[str, int], target: tuple[str, int],
                    rtt_ms: float = 20.0) -> int:
        """A :class:`~kvstore.benchmarks.relay.DelayRelay` process inside ``node``; its listening port."""
        proc = self.popen(node, [sys.executable, "-m", "kvstore.benchmarks.relay", "--listen",
                                 f"{listen[0]}:{listen[1]}", "--target", f"{target[0]}:{target[1]}",
                                 "--rtt-ms", str(rtt_ms)], stdout=subprocess.PIPE)  # fmt: skip
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the relay in {node} did not start (exit {proc.wait()})")
        return int(json.loads(line)["port"])

    def close(self) -> None:
        """Kill the lab's processes and remove its namespaces and links; idempotent."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self._procs.clear()
        for link in self._root_links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        self._root_links.clear()
        for ns in reversed(self._netns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._netns.clear()


@dataclass(frozen=True, slots=True)
class HttpReply:
    """One HTTP reply: status, headers (lower-case names) and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        """The body as a JSON object.

        Raises:
            ValueError: the body is not a JSON object.
        """
        out = json.loads(self.body)
        if not isinstance(out, dict):
            raise ValueError(f"expected a JSON object, got {self.body[:200]!r}")
        return out


def call_host(host: str, port: int, method: str, path: str,
              body: bytes | Mapping[str, Any] | list[Any] | None = None, token: str | None = None,
              headers: Mapping[str, str] | None = None, timeout: float = 30.0) -> HttpReply:
    """One HTTP request to ``host:port`` (a mapping body is sent as JSON, with a bearer ``token``)."""
    raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    hdrs = dict(headers or {})
    if not isinstance(body, bytes) and body is not None:
        hdrs.setdefault("Content-Type", "application/json")
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=raw, headers=hdrs)
        r = conn.getresponse()
        return HttpReply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def _tbf(rate: str) -> list[str]:
    """tbf parameters for ``rate``: a burst of ~8 ms (at least 64 KiB > GSO_MAX), ~30 ms of queue."""
    bytes_s = rate_bps(rate) / 8
    burst = max(int(bytes_s * 0.008), 64 << 10)
    limit = max(int(bytes_s * 0.030), 2 * burst)
    return ["rate", rate, "burst", str(burst), "limit", str(limit)]


# -- tools run inside a node to check a lab (throughput, RTT) -------------------------------------
def _sink(port: int) -> None:
    with socket.create_server(("0.0.0.0", port)) as srv:
        print(json.dumps({"ready": True}), flush=True)
        conn, _ = srv.accept()
        total, buf = 0, bytearray(1 << 20)
        with conn:
            while n := conn.recv_into(buf):
                total += n
        print(json.dumps({"bytes": total}), flush=True)


def _send(host: str, port: int, seconds: float) -> None:
    """Send as fast as TCP allows for ``seconds``; print (elapsed_s, bytes_acked_so_far) samples."""
    block = b"\0" * (1 << 20)
    samples: list[tuple[float, int]] = []
    with socket.create_connection((host, port), timeout=seconds + 10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        t0 = time.monotonic()
        sent, next_sample = 0, 0.0
        while (now := time.monotonic() - t0) < seconds:
            sent += s.send(block)
            if now >= next_sample:
                samples.append((now, sent))
                next_sample = now + 0.05
        samples.append((time.monotonic() - t0, sent))
    print(json.dumps({"samples": samples}), flush=True)


def _echo(port: int) -> None:
    with socket.create_server(("0.0.0.0", port)) as srv:
        print(json.dumps({"ready": True}), flush=True)
        while True:
            conn, _ = srv.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)


def _ping(host: str, port: int, count: int) -> None:
    rtts = []
    with socket.create_connection((host, port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            t0 = time.perf_counter()
            s.sendall(b"x" * 64)
            got = 0
            while got < 64:
                got += len(s.recv(64 - got))
            rtts.append(time.perf_counter() - t0)
    print(json.dumps({"rtts": rtts}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvstore.benchmarks.netlab")
    sub = p.add_subparsers(dest="tool", required=True)
    for name in ("sink", "echo"):
        sub.add_parser(name).add_argument("--port", type=int, required=True)
    send = sub.add_parser("send")
    ping = sub.add_parser("ping")
    for q in (send, ping):
        q.add_argument("--host", required=True)
        q.add_argument("--port", type=int, required=True)
    send.add_argument("--seconds", type=float, default=2.0)
    ping.add_argument("--count", type=int, default=20)
    a = p.parse_args(argv)
    if a.tool == "sink":
        _sink(a.port)
    elif a.tool == "echo":
        _echo(a.port)
    elif a.tool == "send":
        _send(a.host, a.port, a.seconds)
    else:
        _ping(a.host, a.port, a.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
