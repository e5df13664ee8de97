"""GET /v1/events: a real daemon streams vLLM-format KV events to subscribers, per tenant."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.connectors.vllm_events import AllBlocksCleared, BlockRemoved, BlockStored, decode_batch
from tests.service.daemon_fixtures import ADMIN_TOKEN, TOKEN_A, TOKEN_B, TOKENS, DaemonProc, namespace, running

NS_A, NS_B = namespace("tenant-a"), namespace("tenant-b")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    for d in running(DaemonProc(tmp_path_factory.mktemp("events"), tokens=TOKENS)):
        d.register("tenant-a", TOKEN_A)
        d.register("tenant-b", TOKEN_B)
        yield d


class Subscriber:
    """One streaming GET /v1/events read in a thread until the daemon ends it (``seconds``)."""

    def __init__(self, d: DaemonProc, token: str, fmt: str, seconds: float) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", d.admin_port, timeout=30)
        self.conn.request(
            "GET", f"/v1/events?format={fmt}&seconds={seconds}&interval_s=0.05",
            headers={"Authorization": f"Bearer {token}"},
        )  # fmt: skip
        self.response = self.conn.getresponse()
        self.body = b""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        self.body = self.response.read()

    def finish(self) -> bytes:
        self.thread.join(60)
        self.conn.close()
        return self.body


def _msgpack_batches(body: bytes) -> list[tuple[int, list[object]]]:
    out, pos = [], 0
    while pos < len(body):
        n = int.from_bytes(body[pos : pos + 4], "big")
        seq = int.from_bytes(body[pos + 4 : pos + 12], "big")
        _, events, _ = decode_batch(body[pos + 12 : pos + 12 + n])
        out.append((seq, events))
        pos += 12 + n
    assert pos == len(body)
    return out


def test_events_stream_stores_removals_and_clears_per_tenant(daemon: DaemonProc) -> None:
    subs = {
        "a": Subscriber(daemon, TOKEN_A, "json", 4),
        "b": Subscriber(daemon, TOKEN_B, "msgpack", 4),
        "admin": Subscriber(daemon, ADMIN_TOKEN, "msgpack", 4),
    }
    assert all(s.response.status == 200 for s in subs.values())
    assert subs["a"].response.getheader("Content-Type") == "application/x-ndjson"
    time.sleep(0.3)  # subscribed before the chunks arrive
    keys_a = daemon.put_chunks(NS_A, list(range(32)), TOKEN_A, seed=0)  # two chunks
    keys_b = daemon.put_chunks(NS_B, list(range(100, 116)), TOKEN_B, seed=5)
    daemon.wait_idle(ADMIN_TOKEN)  # the disk copies are written too
    evict = daemon.call("POST", "/v1/evict", {"namespace": NS_A.id.hex(), "keys": [keys_a[1]]}, TOKEN_A)
    assert evict.status == 200, evict
    assert daemon.call("POST", "/v1/clear", {"namespace": NS_B.id.hex()}, TOKEN_B).status == 200

    lines = [json.loads(line) for line in subs["a"].finish().splitlines()]
    assert [line["seq"] for line in lines] == list(range(len(lines)))
    events_a = [e for line in lines for e in line["events"]]
    stored = {(e["block_hashes"][0], e["medium"]) for e in events_a if e["type"] == "BlockStored"}
    assert all(e["block_size"] == 16 for e in events_a if e["type"] == "BlockStored")
    removed = {h for e in events_a if e["type"] == "BlockRemoved" for h in e["block_hashes"]}
    both = {(k, tier) for k in keys_a for tier in ("cpu", "disk")}
    if removed:  # the evicted chunk was announced in an earlier batch, then its removal
        assert stored == both and removed == {keys_a[1]}
    else:  # stored and evicted within one batch: announced neither way
        assert stored == {(keys_a[0], "cpu"), (keys_a[0], "disk")}
    assert removed <= {keys_a[1]}  # tenant-b's clear is not tenant-a's business
    assert not any(e["type"] == "AllBlocksCleared" for e in events_a)

    batches_b = _msgpack_batches(subs["b"].finish())
    events_b = [e for _, evs in batches_b for e in evs]
    assert {bytes(e.block_hashes[0]).hex() for e in events_b if isinstance(e, BlockStored)} == set(keys_b)
    assert any(isinstance(e, AllBlocksCleared) for e in events_b)
    assert not any(isinstance(e, BlockRemoved) and keys_a[1] in [bytes(h).hex() for h in e.block_hashes]
                   for e in events_b)  # fmt: skip

    every = [e for _, evs in _msgpack_batches(subs["admin"].finish()) for e in evs]
    seen = {bytes(e.block_hashes[0]).hex() for e in every if isinstance(e, BlockStored)}
    assert {keys_a[0], *keys_b} <= seen <= {*keys_a, *keys_b}  # the admin sees every tenant


def test_events_bad_requests_are_clear(daemon: DaemonProc) -> None:
    for query, needle in (("format=xml", "format must be"), ("seconds=-1", "'seconds'"), ("interval_s=x", "number")):
        reply = daemon.call("GET", f"/v1/events?{query}", token=ADMIN_TOKEN)
        assert reply.status == 400 and needle in reply.body.decode(), reply
    assert daemon.call("GET", "/v1/events?seconds=0").status == 401  # a token is needed


def test_a_draining_daemon_ends_its_streams(tmp_path: Path) -> None:
    for d in running(DaemonProc(tmp_path)):
        sub = Subscriber(d, "unused", "json", 3600)
        time.sleep(0.3)
        started = time.monotonic()
        assert d.stop() == 0
        sub.finish()
        assert time.monotonic() - started < 20  # the stream did not hold the drain to its timeout
