"""Migration under faults: links cut and bytes flipped mid-transfer, the receiving daemon killed.

Two real daemons; the sender pushes through a relay that cuts the first
connection or inverts one byte of it at a random offset (frame headers,
headers of containers and payloads alike). Every transfer must finish, and
the receiver must then hold every chunk byte-exact: a cut is resumed by a
reconnect and HAVE, a flipped byte is caught by a checksum (the chunk is sent
again) or by the frame parser (the connection is dropped and resumed); nothing
corrupt is ever stored. The receiving daemon is also SIGKILLed mid-transfer;
after its restart a resumed transfer completes (chunks it had acknowledged
but lost are sent again). Fast run: 6 link faults and 2 kills; ``-m slow``:
60 and 10.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.keys import Namespace
from kvstore.spec import KVSpec, ModelFingerprint
from tests.migration.transfer_helpers import FaultyRelay, daemon_pair, float_chunks, read_chunks, store_chunks
from tests.resilience.common import record
from tests.service.daemon_fixtures import HAVE_DATAPLANE, TOKEN_A, TOKENS, DaemonProc

pytestmark = pytest.mark.skipif(not HAVE_DATAPLANE, reason="the data plane is not built")

#: 32 KiB chunks: 16 tokens x 4 layers x K,V x 2 heads x 64 dims, float16
NS = Namespace("tenant-a", KVSpec(ModelFingerprint("migration-faults"), 4, 2, 64, "float16"), chunk_tokens=16)
CHUNKS = 24


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, DaemonProc]]:
    root = tmp_path_factory.mktemp("mig-faults")
    with daemon_pair(root) as pair:
        yield pair


def _start(a: DaemonProc, peer_port: int, keys: list[Any], codec: str, window: int) -> str:
    body = {"namespace": NS.id.hex(), "peer": f"kvstore://127.0.0.1:{peer_port}", "token": TOKEN_A,
            "keys": [k.hex() for k in keys], "codec": codec, "window": window}  # fmt: skip
    reply = a.call("POST", "/v1/transfers", body, TOKEN_A)
    assert reply.status == 200, reply
    return str(reply.json()["id"])


def _wait(d: DaemonProc, tid: str, timeout: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p: dict[str, Any] = d.call("GET", f"/v1/transfers/{tid}", token=TOKEN_A).json()
        if p["state"] not in ("pending", "running"):
            return p
        time.sleep(0.02)
    raise AssertionError(f"transfer {tid} did not finish")


@pytest.mark.parametrize("rounds", [pytest.param(6, id="fast"), pytest.param(60, id="slow", marks=pytest.mark.slow)])
def test_cut_and_corrupted_links_never_store_wrong_bytes(pair: tuple[DaemonProc, DaemonProc], rounds: int) -> None:
    a, b = pair
    rng = random.Random(7)
    stream = CHUNKS * NS.chunk_nbytes  # about what the first connection carries
    held = {"cut": 0, "flip": 0}
    tried = dict.fromkeys(held, 0)
    resent = reconnects = 0
    for i in range(rounds):
        fault = "cut" if i % 2 == 0 else "flip"
        keys, chunks = float_chunks(NS, CHUNKS, seed=1000 + i)
        store_chunks(a.port, TOKEN_A, NS, keys, chunks)
        at = rng.randrange(64, stream)
        relay = FaultyRelay(b.port, **({"cut_after": at} if fault == "cut" else {"flip_at": at}))
        try:
            p = _wait(a, _start(a, relay.port, keys, rng.choice(["raw", "lossless"]), rng.choice([1, 2, 4])))
        finally:
            relay.close()
        tried[fault] += 1
        resent += int(p["resent"])
        reconnects += int(p["reconnects"])
        assert p["state"] == "done", (fault, at, p)
        assert read_chunks(b.port, TOKEN_A, NS, keys, NS.chunk_nbytes) == [c.tobytes() for c in chunks], (fault, at)
        held[fault] += 1
    record("migration", "push through a link cut once at a random byte (raw or lossless in transit)", tried["cut"],
           held["cut"], f"every transfer done, peer byte-exact; {reconnects} reconnects in all")  # fmt: skip
    record("migration", "push with one byte inverted in transit at a random offset", tried["flip"], held["flip"],
           f"every transfer done, peer byte-exact, nothing corrupt stored; {resent} chunks sent again")  # fmt: skip


@pytest.mark.parametrize("kills", [pytest.param(2, id="fast"), pytest.param(10, id="slow", marks=pytest.mark.slow)])
def test_receiver_killed_mid_transfer_then_resumed(tmp_path: Path, kills: int) -> None:
    a = DaemonProc(tmp_path / "a", tokens=TOKENS, name="a").start()
    b = DaemonProc(tmp_path / "b", tokens=TOKENS, name="b").start()
    rng = random.Random(11)
    held = relost = 0
    try:
        for i in range(kills):
            keys, chunks = float_chunks(NS, 96, seed=2000 + i)
            store_chunks(a.port, TOKEN_A, NS, keys, chunks)
            tid = _start(a, b.port, keys, "raw", 1)
            target = rng.randrange(4, 48)
            while a.call("GET", f"/v1/transfers/{tid}", token=TOKEN_A).json()["chunks_done"] < target:
                time.sleep(0.002)
            b.stop(signal.SIGKILL)
            p = _wait(a, tid)
            if p["state"] == "failed":
                assert "unreachable" in str(p["error"]), p
            b.start()
            if p["state"] != "done":
                assert a.call("POST", f"/v1/transfers/{tid}/resume", token=TOKEN_A).status == 200
                p = _wait(a, tid)
            assert p["state"] == "done", p
            relost += int(p.get("relost", 0))
            got = read_chunks(b.port, TOKEN_A, NS, keys, NS.chunk_nbytes)
            if got != [c.tobytes() for c in chunks]:  # a chunk the restarted peer had lost is not a wrong one
                assert all(g is None or g == c.tobytes() for g, c in zip(got, chunks)), "wrong bytes stored"
                raise AssertionError(f"{got.count(None)} chunks missing after the resumed transfer")
            held += 1
    finally:
        a.stop()
        b.stop(signal.SIGKILL)
    record("migration", "receiving daemon SIGKILLed mid-push, restarted, transfer resumed", kills, held,
           f"every resumed transfer done, peer byte-exact; {relost} acknowledged chunks the peer had lost sent again")
