"""The data-plane server as a real process, spoken to in raw frames.

Every malformed frame gets a clear error (and the connection is closed only
when the stream cannot be resynchronised), the daemon keeps serving other
clients, BUSY bounds what one connection has in flight, tokens bind tenants,
one tenant never reaches another's chunks, and a client that disappears
mid-request leaves no reservation and no pin behind.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from kvstore.checksum import checksum
from kvstore.client import ChunkCorrupt, Client, Forbidden, LeaseError, Unauthorized, UnknownNamespace
from kvstore.keys import Namespace, prefix_keys
from kvstore.service.dataplane import DataPlaneConfig, make_dataplane
from kvstore.service.protocol import (
    MAGIC,
    PREFIX,
    ErrorCode,
    MsgType,
    PayloadTooLarge,
    ProtocolError,
    error_code,
    frame,
    namespace_from_wire,
    namespace_to_wire,
    pack_prefix,
    unpack_prefix,
)
from kvstore.spec import KVSpec, ModelFingerprint
from kvstore.tiers.cpu import CPUTier, CPUTierConfig
from kvstore.tiers.store import TieredStore
from tests.service import dataplane_fixtures
from tests.service.dataplane_fixtures import DataPlaneProcess, RawConn, wait_until

SERVER_ARGS = ("--frame-timeout", "1", "--max-inflight", "16MiB")
TOKENS = ("--token", "alice-secret=alice", "--token", "bob-secret=bob")


@pytest.fixture(scope="module")
def dataplane() -> Iterator[DataPlaneProcess]:
    """One server for the module's tests (each uses keys of its own): 1 s frame timeout, 16 MiB in flight."""
    dp = dataplane_fixtures.start_dataplane(*SERVER_ARGS, cpu_bytes="96MiB")
    try:
        yield dp
    finally:
        dp.stop()


@pytest.fixture(scope="module")
def tenants() -> Iterator[DataPlaneProcess]:
    """A server with two tokens: alice's and bob's."""
    dp = dataplane_fixtures.start_dataplane(*TOKENS)
    try:
        yield dp
    finally:
        dp.stop()

SPEC = KVSpec(ModelFingerprint("tiny"), 2, 2, 8, "float16")
NS = Namespace("t1", SPEC, chunk_tokens=16)
CHUNK = NS.chunk_nbytes  # 2048


def _chunk(seed: int, n: int = CHUNK) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _setup(conn: RawConn, ns: Namespace = NS) -> None:
    conn.ok(MsgType.HELLO, {})
    conn.ok(MsgType.REGISTER, {"spec": namespace_to_wire(ns)})


def _put(conn: RawConn, key: bytes, data: bytes, ns: Namespace = NS) -> dict[str, object]:
    return conn.ok(
        MsgType.PUT, {"ns": ns.id, "keys": [key], "sizes": [len(data)], "checksums": [checksum(data)]}, data
    )


def _error(conn: RawConn) -> dict[str, object]:
    prefix, header, _ = conn.read()
    assert prefix.type == MsgType.ERROR, header
    return header


def _store_stats(dp: DataPlaneProcess) -> dict[str, object]:
    probe = RawConn(dp)
    try:
        probe.ok(MsgType.HELLO, {})
        return probe.ok(MsgType.STATS, {})
    finally:
        probe.close()


def _still_serves(dp: DataPlaneProcess) -> None:
    other = RawConn(dp)
    try:
        other.ok(MsgType.HELLO, {})
        other.ok(MsgType.PING, {})
    finally:
        other.close()


# -- frames that break the stream: an error marked closing, then the connection closes ----------
FATAL: dict[str, tuple[Callable[[], bytes], int, str]] = {
    "bad magic": (lambda: b"HTTP" + bytes(20), ErrorCode.BAD_FRAME, "bad magic"),
    "bad version": (lambda: PREFIX.pack(MAGIC, 9, MsgType.PING, 0, 0, 1, 0), ErrorCode.BAD_FRAME, "version"),
    "huge header_len": (lambda: pack_prefix(MsgType.PING, 1 << 31, 1, 0), ErrorCode.BAD_FRAME, "header of"),
    "huge payload_len": (
        lambda: pack_prefix(MsgType.PUT, 2, 1, 1 << 60) + msgpack.packb({}),
        ErrorCode.TOO_LARGE,
        "exceeds the limit",
    ),
}


@pytest.mark.parametrize("case", sorted(FATAL))
def test_unrecoverable_frames_get_an_error_then_the_connection_closes(
    dataplane: DataPlaneProcess, case: str
) -> None:
    make, code, text = FATAL[case]
    conn = RawConn(dataplane)
    conn.ok(MsgType.HELLO, {})
    conn.send(make())
    err = _error(conn)
    assert err["code"] == code and text in str(err["message"]) and err["closing"] is True
    assert conn.closed_by_peer()
    _still_serves(dataplane)


def test_truncated_frames_are_reported_on_eof_and_on_stall(dataplane: DataPlaneProcess) -> None:
    dp = dataplane
    conn = RawConn(dp)
    conn.ok(MsgType.HELLO, {})
    conn.send(pack_prefix(MsgType.PING, 100, 7, 0) + b"\x80" * 10)  # 10 of 100 header bytes, then EOF
    conn.sock.shutdown(socket.SHUT_WR)
    err = _error(conn)
    assert err["code"] == ErrorCode.BAD_FRAME and "truncated frame" in str(err["message"]) and err["closing"]
    stalled = RawConn(dp)
    stalled.ok(MsgType.HELLO, {})
    stalled.send(pack_prefix(MsgType.PING, 0, 8, 0)[:10])  # half a prefix, then nothing
    err = _error(stalled)
    assert "truncated frame: no bytes for 1 s" in str(err["message"])
    assert stalled.closed_by_peer()
    _still_serves(dp)


# -- bad requests in a well-framed stream: an error, the payload skipped, the connection goes on ----
KEY = b"k" * 32
RECOVERABLE: dict[str, tuple[Callable[[], bytes], int, str]] = {
    "header not msgpack": (
        lambda: pack_prefix(MsgType.PING, 3, 5, 0) + b"\xc1\xc1\xc1",
        ErrorCode.BAD_FRAME,
        "not valid msgpack",
    ),
    "header not a map": (
        lambda: pack_prefix(MsgType.PING, 4, 5, 0) + msgpack.packb([1, 2, 3]),
        ErrorCode.BAD_FRAME,
        "must be a map",
    ),
    "unknown message type": (lambda: frame(200, 5, {}), ErrorCode.UNKNOWN_TYPE, "unknown message type 200"),
    "a reply type as request": (
        lambda: frame(MsgType.OK, 5, {}),
        ErrorCode.UNKNOWN_TYPE,
        "unknown message type",
    ),
    "sizes not matching payload": (
        lambda: (
            frame(MsgType.PUT, 5, {"ns": NS.id, "keys": [KEY], "sizes": [100], "checksums": [bytes(16)]}, 50)
            + b"x" * 50
        ),
        ErrorCode.BAD_REQUEST,
        "sizes add up to 100",
    ),
    "keys of the wrong type": (
        lambda: frame(MsgType.GET, 5, {"ns": NS.id, "keys": "abc"}),
        ErrorCode.BAD_REQUEST,
        "'keys' must be a list",
    ),
    "ns of the wrong type": (
        lambda: frame(MsgType.GET, 5, {"ns": 7, "keys": []}),
        ErrorCode.BAD_REQUEST,
        "'ns' must be 32 bytes",
    ),
    "lease of the wrong type": (
        lambda: frame(MsgType.GET, 5, {"ns": NS.id, "keys": [], "lease": "x"}),
        ErrorCode.BAD_REQUEST,
        "'lease' must be an integer",
    ),
    "payload where none is taken": (
        lambda: frame(MsgType.PING, 5, {}, 3) + b"abc",
        ErrorCode.BAD_REQUEST,
        "PING takes no payload",
    ),
    "bad spec": (
        lambda: frame(MsgType.REGISTER, 5, {"spec": {"tenant": "t", "model": "m", "num_layers": -1}}),
        ErrorCode.BAD_REQUEST,
        "num_layers",
    ),
    "unknown namespace": (
        lambda: frame(MsgType.GET, 5, {"ns": b"z" * 32, "keys": [KEY]}),
        ErrorCode.UNKNOWN_NAMESPACE,
        "unknown namespace",
    ),
}


def test_bad_requests_get_clear_errors_and_the_connection_goes_on(dataplane: DataPlaneProcess) -> None:
    conn = RawConn(dataplane)
    _setup(conn)
    for case in sorted(RECOVERABLE):
        make, code, text = RECOVERABLE[case]
        conn.send(make())
        prefix, err, _ = conn.read()
        assert prefix.type == MsgType.ERROR and prefix.request_id == 5, (case, err)
        assert err["code"] == code and text in str(err["message"]) and err["closing"] is False, (case, err)
        assert conn.ok(MsgType.PING, {}) == {}, case  # the stream is still in step
    _put(conn, KEY, _chunk(1))
    _, reply, body = conn.request(MsgType.GET, {"ns": NS.id, "keys": [KEY]})
    assert reply["sizes"] == [CHUNK] and body == _chunk(1)
    stats = conn.ok(MsgType.STATS, {})
    assert stats["server"]["errors"]["BAD_REQUEST"] >= 6 and stats["server"]["errors"]["UNKNOWN_TYPE"] == 2


def test_checksum_mismatch_stores_nothing(dataplane: DataPlaneProcess) -> None:
    conn = RawConn(dataplane)
    _setup(conn)
    conn.ok(MsgType.DELETE, {"ns": NS.id, "keys": [KEY]})
    before = conn.ok(MsgType.STATS, {})["store"]
    data = _chunk(2)
    conn.send_request(
        MsgType.PUT, {"ns": NS.id, "keys": [KEY], "sizes": [CHUNK], "checksums": [checksum(b"x")]}, data
    )
    err = _error(conn)
    assert err["code"] == ErrorCode.CHECKSUM and "failed their checksum" in str(err["message"])
    trailer = data + checksum(data[:-1])
    conn.send_request(
        MsgType.PUT, {"ns": NS.id, "keys": [KEY], "sizes": [CHUNK], "checksum_trailer": True}, trailer
    )
    assert _error(conn)["code"] == ErrorCode.CHECKSUM
    assert conn.request(MsgType.GET, {"ns": NS.id, "keys": [KEY]})[1]["sizes"] == [-1]
    store = conn.ok(MsgType.STATS, {})["store"]
    assert (store["top_used_bytes"], store["top_entries"]) == (before["top_used_bytes"], before["top_entries"])


def test_busy_bounds_what_one_connection_has_in_flight(dataplane: DataPlaneProcess) -> None:
    dp = dataplane
    big = 8 << 20
    conn = RawConn(dp)
    _setup(conn)
    keys = [bytes([i]) * 32 for i in range(2)]
    for i, key in enumerate(keys):
        _put(conn, key, _chunk(i, big))
    for _ in range(4):  # pipelined, nothing read: the replies wait in the daemon, pinned
        conn.send_request(MsgType.GET, {"ns": NS.id, "keys": [keys[0]]})
    put_rid = conn.send_request(
        MsgType.PUT,
        {"ns": NS.id, "keys": [b"p" * 32], "sizes": [4 << 20], "checksums": [bytes(16)]},
        _chunk(9, 4 << 20),
    )
    replies = [conn.read() for _ in range(5)]
    kinds = [p.type for p, _, _ in replies]
    assert kinds[:2] == [MsgType.OK, MsgType.OK] and MsgType.BUSY in kinds[2:4], kinds
    assert all(
        body == _chunk(0, big) for p, _, body in replies if p.type == MsgType.OK and p.request_id != put_rid
    )
    busy = [h for p, h, _ in replies if p.type == MsgType.BUSY]
    assert "in flight" in str(busy[0]["message"]) and float(busy[0]["retry_after_s"]) > 0
    assert (
        replies[4][0].request_id == put_rid and replies[4][0].type == MsgType.BUSY
    )  # its payload was skipped
    conn.send_request(
        MsgType.PUT,
        {"ns": NS.id, "keys": [b"q" * 32], "sizes": [17 << 20], "checksums": [bytes(16)]},
        bytes(17 << 20),
    )
    assert _error(conn)["code"] == ErrorCode.TOO_LARGE  # more than the limit alone: retrying cannot help
    assert conn.ok(MsgType.PING, {}) == {}
    stats = conn.ok(MsgType.STATS, {})
    assert stats["server"]["busy"] >= 2 and stats["store"]["top_pinned"] == 0
    conn.ok(MsgType.DELETE, {"ns": NS.id, "keys": keys})
    conn.close()


def test_a_vanished_client_leaves_no_reservation_and_no_pin(dataplane: DataPlaneProcess) -> None:
    opened = _store_stats(dataplane)["server"]["connections"]
    conn = RawConn(dataplane, unix=True)
    _setup(conn)
    _put(conn, b"v" * 32, _chunk(3, 4 << 20))
    base = _store_stats(dataplane)["store"]["top_used_bytes"]
    conn.send(
        frame(
            MsgType.PUT,
            9,
            {"ns": NS.id, "keys": [b"u" * 32], "sizes": [8 << 20], "checksums": [bytes(16)]},
            8 << 20,
        )
        + bytes(1 << 20)
    )  # 1 of 8 MiB, then gone
    shm = RawConn(dataplane, unix=True)
    _setup(shm)
    assert shm.ok(MsgType.SHM_RESERVE, {"ns": NS.id, "keys": [b"r" * 32], "sizes": [4 << 20]})["reservation"]
    assert shm.ok(MsgType.SHM_GET, {"ns": NS.id, "keys": [b"v" * 32]})["pin"]
    during = _store_stats(dataplane)
    assert during["server"]["reservations"] == 2 and during["server"]["shm_pins"] == 1
    assert during["store"]["top_pinned"] == 1 and during["store"]["top_used_bytes"] > base
    conn.close()
    shm.close()
    assert wait_until(lambda: _store_stats(dataplane)["server"]["connections"] <= opened)
    after = _store_stats(dataplane)
    assert after["server"]["reservations"] == 0 and after["server"]["shm_pins"] == 0
    assert after["store"]["top_pinned"] == 0 and after["store"]["top_used_bytes"] == base


def test_shared_memory_is_offered_on_the_unix_socket_only(dataplane: DataPlaneProcess) -> None:
    unix, tcp = RawConn(dataplane, unix=True), RawConn(dataplane)
    offer = unix.ok(MsgType.HELLO, {})["shm"]
    assert offer == {"path": dataplane.shm_path, "size": 96 << 20}
    assert unix.ok(MsgType.HELLO, {"shm": False})["shm"] is None
    assert tcp.ok(MsgType.HELLO, {})["shm"] is None
    tcp.ok(MsgType.REGISTER, {"spec": namespace_to_wire(NS)})
    tcp.send_request(MsgType.SHM_GET, {"ns": NS.id, "keys": [KEY]})
    assert _error(tcp)["code"] == ErrorCode.FORBIDDEN
    assert os.stat(dataplane.shm_path or "").st_mode & 0o777 == 0o600
    assert os.stat(dataplane.unix_path).st_mode & 0o777 == 0o600


# -- tokens and tenants ---------------------------------------------------------------------------
def test_requests_need_a_valid_token(tenants: DataPlaneProcess) -> None:
    dp = tenants
    conn = RawConn(dp)
    for mt, header in ((MsgType.PING, {}), (MsgType.HELLO, {}), (MsgType.HELLO, {"token": "mallory"})):
        conn.send_request(mt, header)
        err = _error(conn)
        assert err["code"] == ErrorCode.UNAUTHORIZED and not err["closing"], err
    conn.send_request(
        MsgType.PUT, {"ns": NS.id, "keys": [KEY], "sizes": [4], "checksums": [bytes(16)]}, b"abcd"
    )
    assert _error(conn)["code"] == ErrorCode.UNAUTHORIZED  # and the payload was skipped:
    assert conn.ok(MsgType.HELLO, {"token": "alice-secret"})["tenant"] == "alice"
    assert conn.ok(MsgType.PING, {}) == {}
    conn.send_request(MsgType.HELLO, {"token": "bob-secret"})
    assert _error(conn)["code"] == ErrorCode.FORBIDDEN  # one connection, one tenant
    assert "store" not in conn.ok(MsgType.STATS, {})  # no store-wide figures where tenants share a daemon
    with pytest.raises(Unauthorized, match="unknown bearer token"):
        Client.connect(dp.tcp_url, token="mallory", retries=0)
    with pytest.raises(Unauthorized, match="requires a bearer token"):
        Client.connect(dp.unix_url, retries=0)


def test_a_tenant_cannot_reach_another_tenants_chunks(tenants: DataPlaneProcess) -> None:
    dp = tenants
    alice, bob = (
        Client.connect(dp.tcp_url, token="alice-secret"),
        Client.connect(dp.unix_url, token="bob-secret"),
    )
    with alice, bob:
        ns_a, ns_b = alice.register(SPEC, chunk_tokens=16), bob.register(SPEC, chunk_tokens=16)
        assert (ns_a.tenant, ns_b.tenant) == ("alice", "bob") and ns_a.id != ns_b.id
        with pytest.raises(Forbidden):
            bob.register(Namespace("alice", SPEC, chunk_tokens=16))
        tokens = list(range(64))
        keys = prefix_keys(ns_a, tokens)
        chunks = [_chunk(10 + i) for i in range(len(keys))]
        assert alice.put_many(ns_a, keys, chunks) == [True] * 4
        hit = alice.lookup(ns_a, tokens)
        assert hit.hit_chunks == 4 and hit.lease is not None
        out = bytearray(CHUNK)
        # alice's namespace id, used by bob: exactly as if it did not exist
        for call in (
            lambda: bob.get(ns_a, keys[0], out),
            lambda: bob.lookup(ns_a, tokens),
            lambda: bob.list_keys(ns_a),
            lambda: bob.delete(ns_a, keys[0]),
            lambda: bob.clear(ns_a),
            lambda: bob.put(ns_a, keys[0], b"evil"),
        ):
            with pytest.raises(UnknownNamespace, match=f"unknown namespace {ns_a.id.hex()[:16]}"):
                call()
        # alice's real keys under bob's own namespace: misses, no hits, nothing listed or deleted
        assert bob.get_many(ns_b, keys, [bytearray(CHUNK) for _ in keys]) == [None] * 4
        assert bob.lookup(ns_b, keys=keys).hit_chunks == 0
        assert bob.prefetch(ns_b, keys) == 0
        assert bob.list_keys(ns_b) == [] and bob.delete_many(ns_b, keys) == 0 and bob.clear(ns_b) == 0
        assert bob.put(ns_b, keys[0], b"x" * CHUNK)  # accepted, but alice's chunk stays hers:
        assert bob.get(ns_b, keys[0], out) is None
        # alice's lease: bob can neither read through it nor release it
        with pytest.raises(LeaseError):
            bob.get(ns_b, keys[0], out, lease=hit.lease)
        assert bob.release(hit.lease) is False
        outs = [bytearray(CHUNK) for _ in keys]
        assert alice.get_many(ns_a, keys, outs, lease=hit.lease) == [CHUNK] * 4
        assert [bytes(o) for o in outs] == chunks
        assert sorted(alice.list_keys(ns_a)) == sorted(keys)


# -- the protocol module and the server's lifecycle, in process ------------------------------------
def test_protocol_helpers() -> None:
    raw = frame(MsgType.GET, 0x1_0000_0005, {"a": 1}, 3)
    prefix = unpack_prefix(raw[:24], 10)
    assert (prefix.type, prefix.request_id, prefix.payload_len) == (MsgType.GET, 5, 3)
    with pytest.raises(PayloadTooLarge):
        unpack_prefix(raw[:24], 2)
    with pytest.raises(ProtocolError, match="bad magic"):
        unpack_prefix(b"X" * 24, 10)
    assert namespace_from_wire(namespace_to_wire(NS), "t1") == NS
    assert error_code(UnknownNamespace("x")) == ErrorCode.UNKNOWN_NAMESPACE
    assert error_code(ChunkCorrupt("x")) == ErrorCode.CHECKSUM
    assert error_code(RuntimeError("x")) == ErrorCode.INTERNAL
    assert struct.calcsize("<4sBBHIIQ") == 24
    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    for msg_type in (MsgType.PING, MsgType.OK):  # the byte-by-byte examples of docs/protocol.md
        example = frame(msg_type, 7, {})
        assert " ".join(f"{b:02x}" for b in example[:4]) in doc and f" {example[5]:02x} " in doc
    assert frame(MsgType.PING, 7, {}) == bytes.fromhex("4b565331 01 0e 0000 01000000 07000000 0000000000000000 80")
    with pytest.raises(ValueError, match="loopback"):
        DataPlaneConfig(host="0.0.0.0")
    DataPlaneConfig(host="0.0.0.0", tokens={"t0ken": "tenant"})


def test_close_drains_a_request_in_flight_then_refuses_new_ones() -> None:
    async def scenario() -> tuple[dict[str, object], bool]:
        store = TieredStore([CPUTier(CPUTierConfig(16 << 20, prefault=False, pin_memory="never"))])
        server = make_dataplane(store, DataPlaneConfig(port=0))
        await server.start()
        data = _chunk(5, 1 << 20)
        head = frame(
            MsgType.PUT,
            3,
            {"ns": NS.id, "keys": [KEY], "sizes": [len(data)], "checksums": [checksum(data)]},
            len(data),
        )
        loop = asyncio.get_running_loop()
        sock = socket.create_connection(("127.0.0.1", server.port))
        conn_reply: dict[str, object] = {}
        ready, proceed = threading.Event(), threading.Event()

        def client() -> None:
            sock.sendall(
                frame(MsgType.HELLO, 1, {}) + frame(MsgType.REGISTER, 2, {"spec": namespace_to_wire(NS)})
            )
            ready.set()
            proceed.wait(10)
            sock.sendall(head + data[: len(data) // 2])
            sock.sendall(data[len(data) // 2 :])
            raw = RawConnLike(sock)
            for _ in range(3):
                prefix, header, _ = raw.read()
                if prefix.request_id == 3:
                    conn_reply.update(header)

        worker = loop.run_in_executor(None, client)
        await loop.run_in_executor(None, ready.wait, 10)
        await asyncio.sleep(0.2)
        proceed.set()
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(server.close(drain_timeout_s=10))
        await worker
        await closing
        refused = False
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
        except OSError:
            refused = True
        sock.close()
        store.close()
        return conn_reply, refused

    reply, refused = asyncio.run(scenario())
    assert reply == {"stored": [True]} and refused


class RawConnLike(RawConn):
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._rid = 100


def test_shared_memory_put_with_and_without_the_clients_checksum(dataplane: DataPlaneProcess) -> None:
    from kvstore.client._shm import ShmArena

    conn = RawConn(dataplane, unix=True)
    _setup(conn)
    offer = conn.ok(MsgType.HELLO, {})["shm"]
    arena = ShmArena(offer["path"], offer["size"])
    data = _chunk(21)

    def reserve(key: bytes) -> int:
        r = conn.ok(MsgType.SHM_RESERVE, {"ns": NS.id, "keys": [key], "sizes": [CHUNK]})
        arena.view(r["offsets"][0], CHUNK)[:] = np.frombuffer(data, np.uint8)
        return int(r["reservation"])

    # with checksums, the daemon verifies what the client wrote: a wrong digest stores nothing
    conn.send_request(MsgType.SHM_COMMIT, {"reservation": reserve(b"s" * 32), "checksums": [checksum(b"x")]})
    assert _error(conn)["code"] == ErrorCode.CHECKSUM
    assert conn.ok(MsgType.LOOKUP, {"ns": NS.id, "keys": [b"s" * 32], "lease": False})["keys"] == []
    committed = conn.ok(MsgType.SHM_COMMIT, {"reservation": reserve(b"s" * 32), "checksums": [checksum(data)]})
    assert committed["stored"] == [True]
    # without, it is one plain copy; the daemon computes the checksum from the arena when needed
    assert conn.ok(MsgType.SHM_COMMIT, {"reservation": reserve(b"t" * 32), "checksums": None})["stored"] == [True]
    tcp = RawConn(dataplane)
    _setup(tcp)
    for key in (b"s" * 32, b"t" * 32):
        prefix, header, body = tcp.request(MsgType.GET, {"ns": NS.id, "keys": [key]})
        assert prefix.type == MsgType.OK and body == data
        assert header["checksums"] == [checksum(data)]
    tcp.ok(MsgType.DELETE, {"ns": NS.id, "keys": [b"s" * 32, b"t" * 32]})
    conn.close()
    tcp.close()
    arena.close()


def test_a_lapsed_lease_is_ignored_and_the_get_reads_without_it(dataplane: DataPlaneProcess) -> None:
    conn = RawConn(dataplane)
    _setup(conn)
    data = _chunk(31)
    _put(conn, b"l" * 32, data)
    hit = conn.ok(MsgType.LOOKUP, {"ns": NS.id, "keys": [b"l" * 32, b"m" * 32], "ttl_s": 0.2})
    assert hit["lease"] is not None
    time.sleep(0.5)  # the lease lapses; the chunk is still stored
    prefix, header, body = conn.request(MsgType.GET, {"ns": NS.id, "keys": [b"l" * 32], "lease": hit["lease"]})
    assert prefix.type == MsgType.OK and body == data
    assert conn.ok(MsgType.RELEASE, {"lease": hit["lease"]})["released"] is False
    conn.ok(MsgType.DELETE, {"ns": NS.id, "keys": [b"l" * 32]})
    prefix, header, body = conn.request(MsgType.GET, {"ns": NS.id, "keys": [b"l" * 32], "lease": hit["lease"]})
    assert prefix.type == MsgType.OK and header["sizes"] == [-1]  # gone meanwhile: a miss, not an error
    conn.close()
