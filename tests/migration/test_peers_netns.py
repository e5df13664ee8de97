"""Peer sharing between daemons in separate network namespaces over a shaped, delayed link.

Daemon A (node "a") and daemon B (node "b") share one Redis index run by the
test (reached over the lab's management links); B reaches A's data plane only
over the 1 Gbit/s data link, through a relay adding 20 ms of round trip. B
misses locally, finds A in the index, pulls and answers; once A is dead, B's
lookup of keys A had published is a counted miss, not an error.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from kvstore.client.sync import Client
from kvstore.keys import prefix_keys
from tests.migration.netlab import LabDaemon, NetLab, unavailable_reason
from tests.redis_servers import RedisServer
from tests.service.daemon_fixtures import ADMIN_TOKEN, TOKEN_A, TOKENS, chunk_bytes, metric_value

CHUNK = 16
RELAY_PORT = 9100


@pytest.fixture
def lab() -> Iterator[NetLab]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with NetLab(("a", "b"), rate="1gbit") as made:
        yield made


def _peer_args(redis: RedisServer, host_ip: str, name: str, advertise: str, prefix: str) -> list[str]:
    return ["--peer-index-url", f"redis://{host_ip}:{redis.port}/0", "--peer-index-prefix", prefix,
            "--peer-id", name, "--peer-advertise", advertise, "--peer-ttl-s", "1.5", "--peer-timeout-s", "3"]  # fmt: skip


def test_daemon_in_another_namespace_is_found_through_the_index_and_pulled(
    lab: NetLab, tmp_path: Path, redis_server_factory: Callable[..., RedisServer]
) -> None:
    a, b = lab.node("a"), lab.node("b")
    redis = redis_server_factory(extra_args=("--bind", "127.0.0.1", a.host_ip, b.host_ip)).start()
    prefix = f"kvt-{uuid.uuid4().hex[:8]}"
    da = LabDaemon(lab, "a", tmp_path / "a", TOKENS, _peer_args(redis, a.host_ip, "a", f"{a.ip}:{RELAY_PORT}", prefix))
    db = LabDaemon(lab, "b", tmp_path / "b", TOKENS, _peer_args(redis, b.host_ip, "b", f"{b.ip}:7481", prefix))
    da.start()
    db.start()
    lab.start_relay("a", (a.ip, RELAY_PORT), ("127.0.0.1", da.port), rtt_ms=20.0)

    ns = da.register("tenant-a", TOKEN_A)
    tokens = list(range(8 * CHUNK))
    later = list(range(10_000, 10_000 + 2 * CHUNK))
    da.put_chunks(ns, tokens, TOKEN_A, seed=5)
    da.put_chunks(ns, later, TOKEN_A, seed=50)
    with redis.client() as r:
        key = f"{prefix}:{{{ns.id.hex()}}}:chunks:a"
        deadline = time.monotonic() + 10
        while r.hlen(key) != 10:
            assert time.monotonic() < deadline, "daemon A did not publish its chunks"
            time.sleep(0.05)

    with Client.connect(db.url, token=TOKEN_A, use_shm=False) as kv:
        kv.register(ns)
        t0 = time.monotonic()
        hit = kv.lookup(ns, tokens)
        elapsed = time.monotonic() - t0
        assert hit.hit_tokens == 8 * CHUNK
        assert elapsed >= 0.020  # at least one round trip through the relay
        for i, k in enumerate(prefix_keys(ns, tokens)):
            out = np.empty(2048, dtype=np.uint8)
            assert kv.get(ns, k, out, lease=hit.lease) == 2048
            assert out.tobytes() == chunk_bytes(5 + i)
        kv.release(hit)

        da.kill()  # A dies: its entries stay in the index until they expire
        assert kv.lookup(ns, later, lease=False).hit_tokens == 0
    metrics = db.call("GET", "/metrics", token=ADMIN_TOKEN).body.decode()
    assert metric_value(metrics, "kvstore_peer_pulled_chunks_total") == 8
    assert metric_value(metrics, "kvstore_peer_misses_total", reason="peer_unreachable") == 1
    db.stop()
