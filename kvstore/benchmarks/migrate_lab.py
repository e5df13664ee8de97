"""Two ``kvstore serve`` daemons in a network lab, for ``kvstore bench migrate``.

Daemon A (node ``a``) holds the chunks and pushes; daemon B (node ``b``)
receives. A reaches B's data plane only over the shaped data link, through a
:class:`~kvstore.benchmarks.relay.DelayRelay` inside B that adds the round
trip (``kvstore://<b's data ip>:<relay port>``). The benchmark itself talks
to both daemons over the unshaped management links: it stores chunks on A,
starts transfers through A's admin API, deletes what arrived on B between
runs and reads it back from B.

A transfer's time is the source daemon's own record (``elapsed_s`` of the
transfer: from the admin request that started it until the peer had
acknowledged every chunk, i.e. stored it after its checks); the benchmark
polls for the end without adding to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstore.benchmarks.netlab import NetLab, Node, call_host
from kvstore.client.sync import Client
from kvstore.keys import ChunkKey, Namespace

TOKEN = "bench-tenant-token-0000000000"
ADMIN_TOKEN = "bench-admin-token-0000000000"
TENANT = "bench"
DATA_PORT, ADMIN_PORT, RELAY_PORT = 7481, 7482, 9100
START_TIMEOUT_S = 60.0
FINISHED = ("done", "failed", "cancelled")


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """How a lab daemon runs.

    Attributes:
        cpu_bytes: CPU tier budget (``--cpu-bytes``).
        disk_bytes: disk tier budget; 0 runs without a disk tier.
        tier_codecs: ``--tier-codecs`` (e.g. ``disk=quant:bits=4``), or "" for none.
        max_chunk_bytes: ``--max-chunk-bytes``.
        write_mode: ``--write-mode`` ("" for the daemon's default, write-through).
    """

    cpu_bytes: int = 1 << 30
    disk_bytes: int = 0
    tier_codecs: str = ""
    max_chunk_bytes: int = 64 << 20
    write_mode: str = ""


class LabServe:
    """``kvstore serve`` inside one lab node, bound to every address of the node, with tokens."""

    def __init__(self, lab: NetLab, node: str, workdir: Path, options: ServeOptions) -> None:
        self.lab, self.node = lab, lab.node(node)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        tokens = workdir / "tokens"
        tokens.write_text(f"{TOKEN} {TENANT}\n{ADMIN_TOKEN} *\n")
        tokens.chmod(0o600)
        self.log_path = workdir / "serve.log"
        argv = [sys.executable, "-m", "kvstore.cli", "serve", "--host", "0.0.0.0", "--admin-host", "0.0.0.0",
                "--port", str(DATA_PORT), "--admin-port", str(ADMIN_PORT), "--tokens-file", str(tokens),
                "--cpu-bytes", str(options.cpu_bytes), "--max-chunk-bytes", str(options.max_chunk_bytes),
                "--log-level", "warning", "--no-access-log"]  # fmt: skip
        if options.disk_bytes:
            argv += ["--data-dir", str(workdir / "data"), "--disk-bytes", str(options.disk_bytes)]
        else:
            argv += ["--no-disk"]
        if options.tier_codecs:
            argv += ["--tier-codecs", options.tier_codecs]
        if options.write_mode:
            argv += ["--write-mode", options.write_mode]
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LabServe:
        """Start and wait for /healthz over the management link.

        Raises:
            RuntimeError: the daemon exited or did not answer in time (with its log's tail).
        """
        with open(self.log_path, "ab") as log:
            self.proc = self.lab.popen(self.node.name, self.argv, stdout=log, stderr=log, cwd=self.workdir,
                                       stdin=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvstore serve in {self.node.name} exited {self.proc.returncode}:\n{self.log()}")
            try:
                if call_host(self.node.mgmt_ip, ADMIN_PORT, "GET", "/healthz", timeout=2).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"kvstore serve in {self.node.name} did not start:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the daemon and wait for it (killed after ``timeout``); idempotent."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self, nbytes: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-nbytes:].decode(errors="replace")
        except OSError:
            return ""

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None,
              token: str = ADMIN_TOKEN, timeout: float = 30.0) -> dict[str, Any]:
        """One admin API call over the management link; the JSON reply.

        Raises:
            RuntimeError: a status other than 2xx (with the body).
        """
        reply = call_host(self.node.mgmt_ip, ADMIN_PORT, method, path, body, token, timeout=timeout)
        if not 200 <= reply.status < 300:
            raise RuntimeError(f"{method} {path} on {self.node.name}: {reply.status} {reply.body[:500]!r}")
        return reply.json()

    def client(self) -> Client:
        """A data-plane client over the management link (unshaped)."""
        return Client.connect(f"kvstore://{self.node.mgmt_ip}:{DATA_PORT}", token=TOKEN, use_shm=False,
                              timeout_s=120.0)  # fmt: skip

    def cpu_usage_s(self) -> float:
        """CPU seconds (user + system) the daemon process has used so far (0.0 where unknown)."""
        pid = self._daemon_pid()
        if pid is None:
            return 0.0
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _daemon_pid(self) -> int | None:
        """``ip netns exec`` execs the command, so the child's pid is the daemon's."""
        return None if self.proc is None else self.proc.pid


@dataclass(frozen=True, slots=True)
class TransferResult:
    """One finished transfer as the source daemon recorded it."""

    state: str
    elapsed_s: float
    bytes_raw: int
    bytes_sent: int
    codecs: dict[str, int]
    deadline_met: bool | None
    error: str | None

    @classmethod
    def of(cls, record: dict[str, Any]) -> TransferResult:
        return cls(str(record["state"]), float(record["elapsed_s"]), int(record["bytes_raw"]),
                   int(record["bytes_sent"]), dict(record.get("codecs") or {}), record.get("deadline_met"),
                   record.get("error"))  # fmt: skip


class Pair:
    """Daemon A pushing to daemon B over the lab's shaped link through a relay in B."""

    def __init__(self, lab: NetLab, workdir: Path, source: ServeOptions, target: ServeOptions,
                 rtt_ms: float) -> None:
        self.lab = lab
        self.a = LabServe(lab, "a", workdir / "a", source)
        self.b = LabServe(lab, "b", workdir / "b", target)
        self.rtt_ms = rtt_ms
        self.peer_url = ""

    def start(self, peer_url: str = "") -> Pair:
        """Start both daemons, and the relay unless ``peer_url`` names one already running in B
        (a relay connects to B's data plane per connection, so it outlives the daemons behind it)."""
        self.a.start()
        self.b.start()
        if not peer_url:
            b: Node = self.lab.node("b")
            port = self.lab.start_relay("b", (b.ip, RELAY_PORT), ("127.0.0.1", DATA_PORT), rtt_ms=self.rtt_ms)
            peer_url = f"kvstore://{b.ip}:{port}"
        self.peer_url = peer_url
        return self

    def stop(self) -> None:
        """Stop both daemons (the relay stays, for the next pair)."""
        self.a.stop()
        self.b.stop()

    def transfer(self, ns: Namespace, keys: Sequence[ChunkKey], codec: str, deadline_s: float | None = None,
                 window: int = 4, poll_s: float = 0.01, timeout_s: float = 600.0) -> TransferResult:
        """Push ``keys`` from A to B and wait for the end.

        Raises:
            RuntimeError: the admin API refused it, or it did not finish in ``timeout_s``.
        """
        body: dict[str, Any] = {"peer": self.peer_url, "namespace": ns.id.hex(), "keys": [k.hex() for k in keys],
                                "token": TOKEN, "codec": codec, "window": window}  # fmt: skip
        if deadline_s is not None:
            body["deadline_s"] = deadline_s
        tid = self.a.admin("POST", "/v1/transfers", body, token=TOKEN)["id"]
        end = time.monotonic() + timeout_s
        while True:
            record = self.a.admin("GET", f"/v1/transfers/{tid}", token=TOKEN)
            if record["state"] in FINISHED:
                return TransferResult.of(record)
            if time.monotonic() > end:
                raise RuntimeError(f"transfer {tid} still {record['state']} after {timeout_s} s")
            time.sleep(poll_s)

    def clear_target(self, ns: Namespace, keys: Sequence[ChunkKey]) -> None:
        """Delete ``keys`` on B (so that the next transfer sends them again)."""
        with self.b.client() as kv:
            kv.register(ns)
            kv.delete_many(ns, list(keys))
