"""The hand-off's wire side against real daemons: ANNOUNCE, LOOKUP ``wait_s``, and pushes that announce.

A lookup that asks to wait gets chunks announced and stored meanwhile; a wait
that runs out returns the shorter hit; a withdrawal ends a wait; bad
announcements (ttl, too many keys, an unknown or another tenant's namespace)
are refused clearly; a daemon-driven push announces its chunks at its start
and withdraws what it does not deliver.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvstore.builder import TiersConfig, build_store
from kvstore.client import Client
from kvstore.errors import InvalidInput, UnknownNamespace
from kvstore.keys import ChunkKey, Namespace
from kvstore.service.migration.link import LinkEstimator
from kvstore.service.migration.progress import TransferProgress
from kvstore.service.migration.transfer import TransferFailed, TransferRequest, run
from kvstore.service.protocol import MsgType, ServerBusy, decode_header, frame, unpack_prefix
from kvstore.spec import KVSpec, ModelFingerprint

from tests.migration.transfer_helpers import FaultyRelay, float_chunks
from tests.service.daemon_fixtures import HAVE_DATAPLANE, TOKEN_A, TOKEN_B, TOKENS, DaemonProc

pytestmark = pytest.mark.skipif(not HAVE_DATAPLANE, reason="the data plane is not built")

NS = Namespace("tenant-a", KVSpec(ModelFingerprint("handoff-test"), 2, 2, 16, "float16"), chunk_tokens=16)
NS_B = Namespace("tenant-b", NS.spec, chunk_tokens=16)
LIMITS = {"KVSTORE_HANDOFF_MAX_KEYS": "64", "KVSTORE_HANDOFF_MAX_TTL_S": "30", "KVSTORE_HANDOFF_MAX_WAIT_S": "4"}


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path_factory.mktemp("handoff-t"), tokens=TOKENS, env=LIMITS, args=["--no-disk"]).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def open_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path_factory.mktemp("handoff-o"), args=["--no-disk"]).start()
    yield d
    d.stop()


def connect(d: DaemonProc, token: str | None = TOKEN_A, ns: Namespace = NS) -> Client:
    c = Client.connect(f"kvstore://127.0.0.1:{d.port}", token=token, retries=0)
    c.register(ns)
    return c


def later(delay_s: float, fn: object) -> threading.Thread:
    def go() -> None:
        time.sleep(delay_s)
        fn()  # type: ignore[operator]

    t = threading.Thread(target=go)
    t.start()
    return t


def test_lookup_waits_for_announced_chunks_and_gets_the_full_hit(tenants: DaemonProc) -> None:
    keys, chunks = float_chunks(NS, 6, seed=11)
    with connect(tenants) as c:
        assert all(c.put_many(NS, keys[:2], chunks[:2]))
        assert c.announce(NS, keys, ttl_s=20) == 4  # the two held are not expected
        assert c.lookup(NS, keys=keys, lease=False).hit_chunks == 2  # no wait_s: answered at once

        def deliver() -> None:
            with connect(tenants) as sender:
                for key, chunk in zip(keys[2:], chunks[2:]):
                    time.sleep(0.1)
                    assert sender.put(NS, key, chunk)

        t = later(0.3, deliver)
        start = time.monotonic()
        hit = c.lookup(NS, keys=keys, wait_s=20)
        took = time.monotonic() - start
        t.join()
        assert hit.hit_chunks == 6 and hit.lease is not None, hit
        assert 0.5 < took < 10, took  # woken by the arrivals, not by the bound
        outs = [np.empty_like(x) for x in chunks]
        assert c.get_many(NS, keys, outs, lease=hit.lease) == [x.nbytes for x in chunks]
        assert all(np.array_equal(o, x) for o, x in zip(outs, chunks))


def test_a_wait_that_runs_out_returns_the_shorter_hit(tenants: DaemonProc) -> None:
    keys, chunks = float_chunks(NS, 4, seed=12)
    with connect(tenants) as c:
        c.announce(NS, keys, ttl_s=20)
        assert c.put(NS, keys[0], chunks[0])
        start = time.monotonic()
        hit = c.lookup(NS, keys=keys, wait_s=1.0, lease=False)
        took = time.monotonic() - start
        assert hit.hit_chunks == 1 and 0.9 < took < 4, (hit, took)  # never an error
        start = time.monotonic()
        assert c.lookup(NS, keys=keys, wait_s=600, lease=False).hit_chunks == 1  # capped at the daemon's 4 s
        assert 3.5 < time.monotonic() - start < 8
        assert c.withdraw(NS, keys) == 3


def test_a_withdrawal_ends_the_wait(tenants: DaemonProc) -> None:
    keys, _ = float_chunks(NS, 3, seed=13)
    with connect(tenants) as c, connect(tenants) as sender:
        assert sender.announce(NS, keys, ttl_s=25) == 3
        t = later(0.4, lambda: sender.withdraw(NS, keys))
        start = time.monotonic()
        hit = c.lookup(NS, keys=keys, wait_s=20, lease=False)
        t.join()
        assert hit.hit_chunks == 0 and time.monotonic() - start < 3


def test_announcements_expire_by_themselves(tenants: DaemonProc) -> None:
    keys, _ = float_chunks(NS, 2, seed=14)
    with connect(tenants) as c:
        c.announce(NS, keys, ttl_s=0.5)
        start = time.monotonic()
        assert c.lookup(NS, keys=keys, wait_s=4, lease=False).hit_chunks == 0
        assert time.monotonic() - start < 3


def test_bad_announcements_are_refused_clearly(tenants: DaemonProc) -> None:
    keys, _ = float_chunks(NS, 2, seed=15)
    with connect(tenants) as c:
        for ttl in (0, -1, 31, float("nan"), float("inf")):
            with pytest.raises(InvalidInput, match="ttl_s"):
                c.announce(NS, keys, ttl_s=ttl)
        with pytest.raises(InvalidInput, match="ttl_s"):
            c.announce(NS, keys, ttl_s="5")  # type: ignore[arg-type]
        many = [ChunkKey(i.to_bytes(32, "little")) for i in range(16385)]
        with pytest.raises(InvalidInput, match="at most 16384"):
            c.announce(NS, many, ttl_s=10)
        with pytest.raises(ServerBusy, match="at most 64"):
            c.announce(NS, many[:65], ttl_s=10)  # the daemon's registry holds 64 keys at most
        assert c.announce(NS, many[:64], ttl_s=10) == 64  # nothing of the refused one was taken
        assert c.withdraw(NS, many[:64]) == 64
        unknown = Namespace("tenant-a", KVSpec(ModelFingerprint("never-registered"), 2, 2, 16, "float16"))
        with pytest.raises(UnknownNamespace):
            c.announce(unknown, keys, ttl_s=10)
        with pytest.raises(InvalidInput, match="wait_s"):
            c.lookup(NS, keys=keys, wait_s=-1)
    reply = raw_request(tenants, TOKEN_A, MsgType.LOOKUP, {"ns": NS.id, "keys": keys, "wait_s": -1})
    assert reply["code"] == 2 and "wait_s" in reply["message"], reply
    reply = raw_request(tenants, TOKEN_A, MsgType.ANNOUNCE, {"ns": NS.id, "keys": keys})
    assert reply["code"] == 2 and "ttl_s" in reply["message"], reply


def test_another_tenants_namespace_is_refused_and_never_awaited(tenants: DaemonProc) -> None:
    keys, chunks = float_chunks(NS, 2, seed=16)
    with connect(tenants) as a, connect(tenants, TOKEN_B, NS_B) as b:
        assert a.put(NS, keys[0], chunks[0])
        for call in (lambda: b.announce(NS, keys, ttl_s=10), lambda: b.withdraw(NS, keys),
                     lambda: b.lookup(NS, keys=keys, wait_s=2)):  # fmt: skip
            with pytest.raises(UnknownNamespace):
                call()
        assert b.announce(NS_B, keys, ttl_s=20) == 2  # B's own namespace: A's keys mean nothing there
        start = time.monotonic()
        assert a.lookup(NS, keys=keys, wait_s=3, lease=False).hit_chunks == 1  # A does not wait for B's
        assert time.monotonic() - start < 1
        assert a.announce(NS, keys[1:], ttl_s=20) == 1
        assert b.withdraw(NS_B, keys) == 2 and a.withdraw(NS, keys) == 1  # each its own


def raw_request(d: DaemonProc, token: str, mt: MsgType, header: dict[str, object]) -> dict[str, object]:
    """One request on a fresh connection after HELLO; the reply's header."""
    with socket.create_connection(("127.0.0.1", d.port), timeout=15) as sock:
        for rid, (t, h) in enumerate(((MsgType.HELLO, {"token": token}), (mt, header)), 1):
            sock.sendall(frame(t, rid, h))
            prefix = unpack_prefix(_recv(sock, 24), 1 << 20)
            reply = decode_header(_recv(sock, prefix.header_len))
            _recv(sock, prefix.payload_len)
    return reply


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        assert part, "connection closed"
        buf += part
    return buf


# -- the daemon-driven push announces and withdraws -------------------------------------
def inflight(d: DaemonProc) -> dict[str, int]:
    with Client.connect(f"kvstore://127.0.0.1:{d.port}") as c:
        found = c.stats().inflight
    assert found is not None
    return dict(found)


def push(tmp_path: Path, peer_port: int, keys: list[ChunkKey], chunks: list[np.ndarray],
         **req: object) -> tuple[TransferProgress, BaseException | None]:
    """A push from an in-process store holding ``chunks`` (the first keys) to the daemon at ``peer_port``."""
    store = build_store(TiersConfig(cpu_bytes=8 << 20, data_dir=None))
    ns = Namespace(NS.tenant, NS.spec, chunk_tokens=16)
    store.register_namespace(ns)
    for key, chunk in zip(keys, chunks):
        assert store.put(ns, key, chunk.view(np.uint8))
    request = TransferRequest(f"kvstore://127.0.0.1:{peer_port}", ns, tuple(keys), **req)  # type: ignore[arg-type]
    progress = TransferProgress("t", "push", request.peer_url, ns.id.hex(), ns.tenant, "raw", len(keys), None)
    try:
        asyncio.run(run(store, request, progress, LinkEstimator()))
        return progress, None
    except BaseException as exc:  # noqa: BLE001 - the caller checks it
        return progress, exc
    finally:
        store.close()


def test_a_push_announces_its_chunks_and_withdraws_those_it_does_not_hold(
        open_daemon: DaemonProc, tmp_path: Path) -> None:
    keys, chunks = float_chunks(NS, 6, seed=17)
    before = inflight(open_daemon)
    progress, error = push(tmp_path, open_daemon.port, keys, chunks[:3])  # the sender holds only 3 of 6
    assert error is None and progress.chunks_missing == 3
    after = inflight(open_daemon)
    assert after["announced"] - before["announced"] == 6
    assert after["arrived"] - before["arrived"] == 3 and after["withdrawn"] - before["withdrawn"] == 3
    assert after["pending"] == 0
    with connect(open_daemon, None) as c:
        start = time.monotonic()
        assert c.lookup(NS, keys=keys, wait_s=20, lease=False).hit_chunks == 3
        assert time.monotonic() - start < 2  # nothing left to wait for


def test_a_failed_push_withdraws_what_it_did_not_deliver(open_daemon: DaemonProc, tmp_path: Path) -> None:
    keys, chunks = float_chunks(NS, 8, seed=18)
    relay = FaultyRelay(open_daemon.port, cut_after=3 * NS.chunk_nbytes)  # the link drops mid-push
    before = inflight(open_daemon)
    try:
        progress, error = push(tmp_path, relay.port, keys, chunks, max_reconnects=0, window=1)
    finally:
        relay.close()
    assert isinstance(error, TransferFailed), error
    after = inflight(open_daemon)
    delivered = after["arrived"] - before["arrived"]
    assert after["announced"] - before["announced"] == 8 and delivered < 8
    assert after["withdrawn"] - before["withdrawn"] == 8 - delivered and after["pending"] == 0
    with connect(open_daemon, None) as c:
        start = time.monotonic()
        assert c.lookup(NS, keys=keys, wait_s=20, lease=False).hit_chunks == delivered
        assert time.monotonic() - start < 2


def test_lookups_without_wait_ignore_announcements(open_daemon: DaemonProc) -> None:
    keys, _ = float_chunks(NS, 2, seed=19)
    with connect(open_daemon, None) as c:
        c.announce(NS, keys, ttl_s=10)
        start = time.monotonic()
        assert c.lookup(NS, keys=keys).hit_chunks == 0 and time.monotonic() - start < 1
        assert c.withdraw(NS, keys) == 2
