"""Daemon-to-daemon transfers between two real daemons on loopback: push, pull, codecs, resume, faults."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvstore.keys import Namespace
from kvstore.spec import KVSpec, ModelFingerprint
from tests.migration.transfer_helpers import (
    FaultyRelay,
    daemon_pair,
    float_chunks,
    ports_held,
    read_chunks,
    store_chunks,
)
from tests.service.daemon_fixtures import HAVE_DATAPLANE, TOKEN_A, TOKEN_B, TOKENS, DaemonProc

pytestmark = pytest.mark.skipif(not HAVE_DATAPLANE, reason="the data plane is not built")

#: 64 KiB chunks: 16 tokens x 4 layers x K,V x 4 heads x 64 dims, float16
NS = Namespace("tenant-a", KVSpec(ModelFingerprint("xfer-test"), 4, 4, 64, "float16"), chunk_tokens=16)
CHUNK = NS.chunk_nbytes


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, DaemonProc]]:
    root = tmp_path_factory.mktemp("xfer")
    with daemon_pair(root) as pair:
        yield pair


def start(a: DaemonProc, body: dict[str, Any], token: str = TOKEN_A) -> dict[str, Any]:
    reply = a.call("POST", "/v1/transfers", {"namespace": NS.id.hex(), **body}, token)
    assert reply.status == 200, reply
    return reply.json()


def wait(d: DaemonProc, tid: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = d.call("GET", f"/v1/transfers/{tid}", token=TOKEN_A).json()
        if p["state"] not in ("pending", "running"):
            return p
        time.sleep(0.05)
    raise AssertionError(f"transfer {tid} did not finish: {p}")


def seeded(a: DaemonProc, n: int, seed: int) -> tuple[list[Any], list[np.ndarray]]:
    keys, chunks = float_chunks(NS, n, seed)
    store_chunks(a.port, TOKEN_A, NS, keys, chunks)
    return keys, chunks


def test_push_raw_moves_every_chunk_bit_exact(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    keys, chunks = seeded(a, 12, seed=1)
    assert read_chunks(b.port, TOKEN_A, NS, keys, CHUNK) == [None] * 12
    p = wait(a, start(a, {"peer": f"kvstore://127.0.0.1:{b.port}", "token": TOKEN_A,
                          "keys": [k.hex() for k in keys]})["id"])  # fmt: skip
    assert p["state"] == "done", p
    assert p["chunks_done"] == 12 and p["bytes_raw"] == 12 * CHUNK and p["codecs"] == {"raw": 12}
    assert sorted(c["key"] for c in p["chunks"]) == sorted(k.hex() for k in keys)  # in acknowledgement order
    assert p["estimate_bytes_per_s"] > 0
    assert read_chunks(b.port, TOKEN_A, NS, keys, CHUNK) == [c.tobytes() for c in chunks]
    # a second push finds everything there (HAVE) and sends nothing
    again = wait(a, start(a, {"peer": f"kvstore://127.0.0.1:{b.port}", "token": TOKEN_A,
                              "keys": [k.hex() for k in keys]})["id"])  # fmt: skip
    assert again["state"] == "done" and again["chunks_skipped"] == 12 and again["bytes_sent"] == 0


def test_push_with_codecs_decodes_and_verifies_before_storing(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    keys, chunks = seeded(a, 8, seed=2)
    p = wait(a, start(a, {"peer": f"kvstore://127.0.0.1:{b.port}", "token": TOKEN_A, "codec": "int8",
                          "keys": [k.hex() for k in keys]})["id"])  # fmt: skip
    assert p["state"] == "done", p
    assert p["codecs"] == {"int8": 8}
    assert p["bytes_sent"] < 0.7 * p["bytes_raw"]  # int8 codes, group scales and the exact first token
    got = read_chunks(b.port, TOKEN_A, NS, keys, CHUNK)
    for raw, chunk in zip(got, chunks):
        assert raw is not None and len(raw) == CHUNK
        back = np.frombuffer(raw, dtype=np.float16).astype(np.float32)
        assert np.abs(back - chunk.astype(np.float32)).max() < 0.1  # lossy, but the same KV
        assert raw != chunk.tobytes()


def test_auto_policy_prefers_lossless_without_a_deadline(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    keys, chunks = seeded(a, 6, seed=3)
    p = wait(a, start(a, {"peer": f"kvstore://127.0.0.1:{b.port}", "token": TOKEN_A, "codec": "auto",
                          "keys": [k.hex() for k in keys]})["id"])  # fmt: skip
    assert p["state"] == "done", p
    assert set(p["codecs"]) <= {"raw", "lossless"}
    assert read_chunks(b.port, TOKEN_A, NS, keys, CHUNK) == [c.tobytes() for c in chunks]


def test_resume_after_a_dropped_connection_sends_only_the_rest(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    keys, chunks = seeded(a, 16, seed=4)
    relay = FaultyRelay(b.port, cut_after=5 * CHUNK)
    before = b.call("GET", "/v1/stats", token="admin-token-000000000000").json()["data_plane"]
    try:
        p = wait(a, start(a, {"peer": f"kvstore://127.0.0.1:{relay.port}", "token": TOKEN_A, "window": 2,
                              "keys": [k.hex() for k in keys]})["id"])  # fmt: skip
    finally:
        relay.close()
    assert relay.faults == 1 and relay.connections >= 2
    assert p["state"] == "done", p
    assert p["reconnects"] >= 1
    assert p["chunks_done"] + p["chunks_skipped"] == 16
    after = b.call("GET", "/v1/stats", token="admin-token-000000000000").json()["data_plane"]
    xputs = after["requests"].get("XPUT", 0) - before["requests"].get("XPUT", 0)
    assert xputs <= 16 + 2, (before, after)  # at most the chunks in flight at the cut went twice
    assert read_chunks(b.port, TOKEN_A, NS, keys, CHUNK) == [c.tobytes() for c in chunks]


def test_chunk_corrupted_in_transit_is_resent_never_stored(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    keys, chunks = seeded(a, 4, seed=5)
    relay = FaultyRelay(b.port, flip_at=CHUNK // 2 + 4096)
    try:
        p = wait(a, start(a, {"peer": f"kvstore://127.0.0.1:{relay.port}", "token": TOKEN_A, "window": 1,
                              "keys": [k.hex() for k in keys]})["id"])  # fmt: skip
    finally:
        relay.close()
    assert relay.faults == 1
    assert p["state"] == "done", p
    assert p["resent"] == 1
    assert read_chunks(b.port, TOKEN_A, NS, keys, CHUNK) == [c.tobytes() for c in chunks]


def test_pull_fetches_verified_chunks(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    keys, chunks = seeded(b, 5, seed=6)
    p = wait(a, start(a, {"peer": f"kvstore://127.0.0.1:{b.port}", "token": TOKEN_A, "direction": "pull",
                          "keys": [k.hex() for k in keys]})["id"])  # fmt: skip
    assert p["state"] == "done" and p["chunks_done"] == 5, p
    assert read_chunks(a.port, TOKEN_A, NS, keys, CHUNK) == [c.tobytes() for c in chunks]


def test_bad_token_or_other_tenant_fails_clearly_and_stores_nothing(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    keys, _ = seeded(a, 2, seed=7)
    body = {"peer": f"kvstore://127.0.0.1:{b.port}", "keys": [k.hex() for k in keys]}
    bad = wait(a, start(a, {**body, "token": "not-a-known-token-000000"})["id"])
    assert bad["state"] == "failed" and "Unauthorized" in bad["error"], bad
    other = wait(a, start(a, {**body, "token": TOKEN_B})["id"])
    assert other["state"] == "failed" and "tenant-b" in other["error"], other
    assert read_chunks(b.port, TOKEN_A, NS, keys, CHUNK) == [None, None]


def test_peer_dying_mid_transfer_then_resume(tmp_path: Path) -> None:
    a = DaemonProc(tmp_path / "a", tokens=TOKENS, name="a").start()
    b = DaemonProc(tmp_path / "b", tokens=TOKENS, name="b").start()
    try:
        keys, chunks = float_chunks(NS, 48, seed=8)
        store_chunks(a.port, TOKEN_A, NS, keys, chunks)
        # one chunk in flight, so that the kill lands mid-way
        tid = start(a, {"peer": f"kvstore://127.0.0.1:{b.port}", "token": TOKEN_A, "window": 1,
                        "keys": [k.hex() for k in keys]})["id"]  # fmt: skip
        p = a.call("GET", f"/v1/transfers/{tid}", token=TOKEN_A).json()
        while p["chunks_done"] < 4 and p["state"] == "running":
            time.sleep(0.005)
            p = a.call("GET", f"/v1/transfers/{tid}", token=TOKEN_A).json()
        b.kill()
        # until B is back its ports stay ours: refused, as a dead daemon's, and kept for its restart
        with ports_held(b.port, b.admin_port):
            p = wait(a, tid)
            if p["state"] == "done":
                pytest.skip("the transfer finished before the peer died (machine too fast)")
            assert p["state"] == "failed" and "unreachable" in p["error"], p
            b.start()
        resumed = a.call("POST", f"/v1/transfers/{tid}/resume", token=TOKEN_A)
        assert resumed.status == 200, resumed
        p = wait(a, tid)
        assert p["state"] == "done", p
        assert read_chunks(b.port, TOKEN_A, NS, keys, CHUNK) == [c.tobytes() for c in chunks]
    finally:
        a.stop()
        b.kill()


def test_admin_api_refuses_bad_transfer_requests(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    peer = f"kvstore://127.0.0.1:{b.port}"
    key = "00" * 32
    cases = [
        ({"peer": peer, "namespace": NS.id.hex()}, 400),  # no chunks named
        ({"peer": peer, "namespace": NS.id.hex(), "keys": [key], "all": True}, 400),  # two ways
        ({"peer": "http://x:1", "namespace": NS.id.hex(), "keys": [key]}, 400),
        ({"peer": "kvstore://h:99999", "namespace": NS.id.hex(), "keys": [key]}, 400),
        ({"peer": peer, "namespace": NS.id.hex(), "keys": [key], "codec": "zip"}, 400),
        ({"peer": peer, "namespace": NS.id.hex(), "keys": [key], "deadline_s": -1}, 400),
        ({"peer": peer, "namespace": NS.id.hex(), "keys": [key], "direction": "pull", "codec": "int8"}, 400),
        ({"peer": peer, "namespace": NS.id.hex(), "keys": [key], "bogus": 1}, 400),
        ({"peer": peer, "namespace": "ab" * 32, "keys": [key]}, 404),
    ]
    for body, status in cases:
        reply = a.call("POST", "/v1/transfers", body, TOKEN_A)
        assert reply.status == status, (body, reply)
        assert reply.json()["error"]
    assert a.call("GET", "/v1/transfers/nope", token=TOKEN_A).status == 404
    assert a.call("POST", "/v1/transfers", {"peer": peer, "namespace": NS.id.hex(), "keys": [key]}).status == 401
    # another tenant neither sees nor reads tenant-a's transfers
    mine = start(a, {"peer": peer, "token": TOKEN_A, "keys": [key]})
    assert a.call("GET", f"/v1/transfers/{mine['id']}", token=TOKEN_B).status == 404
    assert all(t["id"] != mine["id"] for t in a.call("GET", "/v1/transfers", token=TOKEN_B).json()["transfers"])
