"""Shared pieces of the resilience suite: a daemon with tokens and tiers, verifiable chunks, results.

Chunks are deterministic bytes derived from their key (:func:`payload`), so any
process can check what the daemon returns without remembering what it put.
Each scenario calls :func:`record` with how often it tried something and how
often it held; with ``KVSTORE_RELIABILITY_DIR`` set, the rows are appended to
``results.jsonl`` there and ``python -m tests.resilience.report`` turns them
into the table of docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvstore.client import Client
from kvstore.keys import ChunkKey, Namespace
from tests.service.daemon_fixtures import ADMIN_TOKEN, TOKENS, DaemonProc, metric_value, namespace

RESULTS_ENV = "KVSTORE_RELIABILITY_DIR"
RESULTS_FILE = "results.jsonl"
TENANT_TOKENS = {"tenant-a": "tenant-a-token-0000000000", "tenant-b": "tenant-b-token-0000000000"}
CHUNK = namespace("tenant-a").chunk_nbytes  # 2048 bytes: the chunk of daemon_fixtures.SPEC


def record(scenario: str, what: str, attempts: int, held: int, detail: str = "") -> None:
    """Append one result row (scenario, what was tried, attempts, how many held) when results are on."""
    out = os.environ.get(RESULTS_ENV)
    if not out:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    row = {"scenario": scenario, "what": what, "attempts": attempts, "held": held, "detail": detail,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(Path(out) / RESULTS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def key_of(tag: str, i: int) -> ChunkKey:
    """A 32-byte key for chunk ``i`` of stream ``tag``."""
    return ChunkKey(hashlib.sha256(f"{tag}/{i}".encode()).digest())


def payload(key: bytes, nbytes: int = CHUNK) -> bytes:
    """The bytes chunk ``key`` must hold: a pure function of the key."""
    seed = int.from_bytes(key[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


def daemon(workdir: Path, *args: str, data_dir: Path | None = None, name: str = "daemon") -> DaemonProc:
    """An unstarted daemon with the test tokens (tenant-a, tenant-b, admin) and extra flags."""
    return DaemonProc(workdir, data_dir=data_dir, args=args, tokens=TOKENS, name=name)


def client(d: DaemonProc, tenant: str = "tenant-a", **kw: Any) -> Client:
    """A blocking data-plane client of ``d`` over TCP with ``tenant``'s token."""
    opts: dict[str, Any] = {"timeout_s": 20.0, "retries": 0, "use_shm": False, **kw}
    return Client.connect(f"kvstore://127.0.0.1:{d.port}", token=TENANT_TOKENS[tenant], **opts)


def metrics(d: DaemonProc) -> str:
    reply = d.call("GET", "/metrics", token=ADMIN_TOKEN)
    assert reply.status == 200, reply
    return reply.body.decode()


def misses(d: DaemonProc, tier: str, reason: str) -> float:
    """``kvstore_tier_misses_total{tier, reason}`` (0 when not exported yet)."""
    return metric_value(metrics(d), "kvstore_tier_misses_total", tier=tier, reason=reason) or 0.0


def tier_stats(d: DaemonProc, name: str) -> dict[str, Any]:
    """One tier's entry of /v1/stats (admin view)."""
    stats = d.call("GET", "/v1/stats", token=ADMIN_TOKEN).json()
    for t in stats["tiers"]:
        if t["name"] == name:
            return dict(t)
    raise AssertionError(f"no tier {name!r} in {[t['name'] for t in stats['tiers']]}")


def verify_all(c: Client, ns: Namespace, keys: Sequence[bytes]) -> tuple[int, int]:
    """Read ``keys`` back; every chunk returned must equal its payload. Returns (returned, missed)."""
    returned = missed = 0
    for part in batched(list(keys), 64):
        outs = [bytearray(CHUNK) for _ in part]
        sizes = c.get_many(ns, part, outs)
        for key, out, n in zip(part, outs, sizes):
            if n is None:
                missed += 1
                continue
            assert n == CHUNK and bytes(out) == payload(key), f"wrong bytes for key {key.hex()}"
            returned += 1
    return returned, missed


def batched(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
