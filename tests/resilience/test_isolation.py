"""Isolation and auth, swept systematically: every admin route of /openapi.json and every frame type.

Tenant A stores chunks and holds a lease; tenant B then aims every admin
operation and every data-plane request type at A's namespace, A's keys and
A's lease (and at its own namespace with A's keys). Nothing of A's may be
read, listed, pinned, evicted, cleared, moved, released or even named back;
afterwards A's chunks and lease are intact. Every protected route refuses a
missing or wrong token; a non-loopback bind without tokens refuses to start.
A route added to the OpenAPI document without a row here fails the test.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.checksum import checksum
from kvstore.service.protocol import MsgType, frame, namespace_to_wire
from tests.redis_servers import free_port
from tests.resilience.common import TENANT_TOKENS, client, daemon, key_of, payload, record, verify_all
from tests.resilience.wire_fuzz import Prober
from tests.service.daemon_fixtures import DaemonProc, namespace, running

TOKEN_A, TOKEN_B = TENANT_TOKENS["tenant-a"], TENANT_TOKENS["tenant-b"]
PUBLIC = {("GET", "/"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/openapi.json")}


class World:
    """A's namespace, keys and lease; B's namespace."""

    def __init__(self, d: DaemonProc) -> None:
        self.d = d
        self.ns_a, self.ns_b = namespace("tenant-a"), namespace("tenant-b")
        self.keys = [key_of("iso-a", i) for i in range(6)]
        with client(d, "tenant-a") as c:
            c.register(self.ns_a)
            assert all(c.put_many(self.ns_a, self.keys, [payload(k) for k in self.keys]))
            hit = c.lookup(self.ns_a, keys=self.keys, ttl_s=300)
            assert hit.lease is not None and hit.hit_chunks == len(self.keys)
            self.lease = int(hit.lease)
        with client(d, "tenant-b") as c:
            c.register(self.ns_b)
        self.a_hex, self.key_hex = self.ns_a.id.hex(), self.keys[0].hex()
        self.secrets = [self.a_hex, *(k.hex() for k in self.keys)]

    def intact(self) -> None:
        with client(self.d, "tenant-a") as c:
            assert verify_all(c, self.ns_a, self.keys) == (len(self.keys), 0), "A lost chunks to B"
            assert set(c.list_keys(self.ns_a)) >= set(self.keys)
        leases = self.d.call("GET", "/v1/leases", token=TOKEN_A).json()["leases"]
        assert any(int(lease["lease"]) == self.lease for lease in leases), "B ended A's lease"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    for d in running(daemon(tmp_path_factory.mktemp("iso"), "--no-disk")):
        yield World(d)


def _admin_cases(w: World) -> dict[tuple[str, str], list[tuple[str, Any, set[int]]]]:
    """(method, path template) -> [(concrete path, body, statuses B may get)]."""
    ns, key, body_ns = w.a_hex, w.key_hex, {"namespace": w.a_hex}
    gone = {403, 404}
    return {
        ("GET", "/metrics"): [("/metrics", None, {403})],
        ("GET", "/v1/stats"): [("/v1/stats", None, {200, 403})],
        ("GET", "/v1/history"): [("/v1/history", None, {200, 403})],
        ("GET", "/v1/config"): [("/v1/config", None, {200, 403})],
        ("GET", "/v1/namespaces"): [("/v1/namespaces", None, {200})],
        ("POST", "/v1/namespaces"): [("/v1/namespaces", {**namespace_to_wire(w.ns_a), "tenant": "tenant-a"}, {403})],
        ("GET", "/v1/leases"): [("/v1/leases", None, {200})],
        ("DELETE", "/v1/leases/{lease}"): [(f"/v1/leases/{w.lease}", None, gone)],
        ("POST", "/v1/lookup"): [("/v1/lookup", {**body_ns, "keys": [key], "lease": True}, gone),
                                 ("/v1/lookup", {"namespace": w.ns_b.id.hex(), "keys": [key], "lease": True}, {200})],
        ("POST", "/v1/pin"): [("/v1/pin", {**body_ns, "keys": [key]}, gone),
                              ("/v1/pin", {"namespace": w.ns_b.id.hex(), "keys": [key]}, {200})],
        ("POST", "/v1/evict"): [("/v1/evict", body_ns, gone), ("/v1/evict", {**body_ns, "keys": [key]}, gone),
                                ("/v1/evict", {"namespace": w.ns_b.id.hex(), "keys": [key]}, {200})],
        ("POST", "/v1/clear"): [("/v1/clear", body_ns, gone)],
        ("POST", "/v1/move"): [("/v1/move", {**body_ns, "keys": [key], "from": "cpu", "to": "cpu"}, {400, 403, 404}),
                               ("/v1/move", {"namespace": w.ns_b.id.hex(), "keys": [key], "from": "cpu",
                                             "to": "cpu"}, {400})],
        ("GET", "/v1/chunks/{ns}/{key}"): [(f"/v1/chunks/{ns}/{key}", None, gone),
                                           (f"/v1/chunks/{w.ns_b.id.hex()}/{key}", None, {404})],
        ("PUT", "/v1/chunks/{ns}/{key}"): [(f"/v1/chunks/{ns}/{key}", b"x" * 2048, gone),
                                           (f"/v1/chunks/{w.ns_b.id.hex()}/{key}", b"x" * 2048, {409})],
        ("GET", "/v1/events"): [("/v1/events?seconds=1&format=json", None, {200})],
        ("POST", "/v1/transfers"): [("/v1/transfers", {**body_ns, "peer": "kvstore://127.0.0.1:1", "keys": [key]},
                                     gone)],
        ("GET", "/v1/transfers"): [("/v1/transfers", None, {200})],
        ("GET", "/v1/transfers/{transfer}"): [("/v1/transfers/t1-00000000", None, gone)],
        ("DELETE", "/v1/transfers/{transfer}"): [("/v1/transfers/t1-00000000", None, gone)],
        ("POST", "/v1/transfers/{transfer}/resume"): [("/v1/transfers/t1-00000000/resume", None, gone)],
    }


def _no_secrets(w: World, text: str, what: str, sent: str = "") -> None:
    """``text`` names none of A's ids except those B itself sent (echoed back as missing is fine)."""
    for s in w.secrets:
        if s in sent:
            continue
        assert s not in text, f"{what} names A's {s[:16]}…"


def test_admin_routes_sweep(world: World) -> None:
    w = world
    doc = w.d.call("GET", "/openapi.json").json()
    routes = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops if m in ("get", "put", "post", "delete")}
    cases = _admin_cases(w)
    assert routes - PUBLIC == set(cases), f"routes without an isolation row: {sorted(routes - PUBLIC - set(cases))}"
    tried = 0
    for (method, _), rows in sorted(cases.items()):
        for path, body, allowed in rows:
            if path.startswith("/v1/events"):
                _events_hide_a(w, path)
                tried += 1
                continue
            reply = w.d.call(method, path, body, TOKEN_B)
            assert reply.status in allowed, (method, path, reply)
            sent = path + (repr(body) if body is not None else "")
            _no_secrets(w, reply.body.decode(errors="replace"), f"{method} {path}", sent)
            for token in (None, "wrong-token-0000000000000"):
                assert w.d.call(method, path, body, token).status == 401, (method, path, token)
            tried += 3
    w.intact()
    record("isolation", "every admin route of /openapi.json with tenant B's token on A's namespace, keys, "
           "lease; missing and wrong tokens", tried, tried, "A's chunks and lease intact, nothing of A named")


def _events_hide_a(w: World, path: str) -> None:
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(w.d.call("GET", path, token=TOKEN_B, timeout=10).body))
    reader.start()
    with client(w.d, "tenant-a") as c:  # events of A's while B listens
        more = [key_of("iso-events", i) for i in range(3)]
        c.put_many(w.ns_a, more, [payload(k) for k in more])
        c.delete_many(w.ns_a, more)
    reader.join(15)
    assert got and got[0].strip() == b"", f"B's event stream carried A's events: {got[0][:200]!r}"


def _frames(w: World) -> list[tuple[int, dict[str, Any], bytes]]:
    """Every request type aimed at A: A's namespace, A's keys under B's namespace, A's lease."""
    a, b, keys = w.ns_a.id, w.ns_b.id, w.keys
    data = payload(key_of("iso-b", 0))  # other bytes: an overwrite of A's chunk would show
    put = {"keys": [keys[0]], "sizes": [len(data)], "checksums": [checksum(data)]}
    out: list[tuple[int, dict[str, Any], bytes]] = [
        (MsgType.HELLO, {"token": TOKEN_A}, b""),
        (MsgType.REGISTER, {"spec": {**namespace_to_wire(w.ns_a), "tenant": "tenant-a"}}, b""),
        (MsgType.RELEASE, {"lease": w.lease}, b""),
        (MsgType.GET, {"ns": b, "keys": keys, "lease": w.lease}, b""),
        (MsgType.LOOKUP, {"ns": b, "keys": keys, "lease": True}, b""),
        (MsgType.SHM_RELEASE, {"pins": [1, 2, 3]}, b""),
        (MsgType.SHM_COMMIT, {"reservation": 1, "checksums": [bytes(16)]}, b""),
        (MsgType.SHM_WRITTEN, {"reservation": 1, "index": 0, "upto": 1}, b""),
        (MsgType.STATS, {}, b""),
        (MsgType.PING, {}, b""),
    ]
    for ns in (a, b):  # A's namespace outright, then B's own namespace with A's keys
        out += [
            (MsgType.PUT, {"ns": ns, **put}, data),
            (MsgType.LOOKUP, {"ns": ns, "keys": keys, "lease": True}, b""),
            (MsgType.GET, {"ns": ns, "keys": keys}, b""),
            (MsgType.DELETE, {"ns": ns, "keys": keys}, b""),
            (MsgType.PREFETCH, {"ns": ns, "keys": keys}, b""),
            (MsgType.SHM_GET, {"ns": ns, "keys": keys}, b""),
            (MsgType.SHM_RESERVE, {"ns": ns, "keys": keys[:1], "sizes": [len(data)]}, b""),
            (MsgType.LIST, {"ns": ns, "limit": 100}, b""),
            (MsgType.CLEAR, {"ns": ns}, b""),
            (MsgType.HAVE, {"ns": ns, "keys": keys}, b""),
            (MsgType.XPUT, {"ns": ns, **put, "codecs": ["raw"]}, data),
            (MsgType.ANNOUNCE, {"ns": ns, "keys": keys, "ttl_s": 30.0}, b""),
            (MsgType.LOOKUP, {"ns": ns, "keys": keys, "lease": True, "wait_s": 1.0}, b""),
            (MsgType.ANNOUNCE, {"ns": ns, "keys": keys, "withdraw": True}, b""),
        ]
    return out


def test_frame_types_sweep(world: World) -> None:
    w = world
    frames = _frames(w)
    assert {int(t) for t, _, _ in frames} >= {int(t) for t in MsgType if t < MsgType.OK}, "a frame type is not swept"
    prober = Prober(w.d.port, TOKEN_B, namespace_to_wire(w.ns_b))
    for mt, header, body in frames:
        sock = prober.connect()
        raw = frame(mt, 9, header, len(body))
        sock.sendall(raw + body)
        got = prober.read()
        assert got is not None, f"{MsgType(mt).name}: closed without a reply"
        kind, reply, out = got
        _check_frame_reply(w, MsgType(mt), header, kind, reply, out)
        if reply.get("closing"):
            prober.close()
    prober.close()
    # unauthenticated connections are refused for every type but HELLO
    anon = 0
    for mt, header, body in frames:
        if mt in (MsgType.HELLO, MsgType.PING):
            continue
        p = Prober(w.d.port, "", {})
        p.sock = socket.create_connection(("127.0.0.1", w.d.port), timeout=15)
        p.sock.sendall(frame(mt, 1, header, len(body)) + body)
        got = p.read()
        assert got is not None and got[0] == MsgType.ERROR and got[1]["code"] == 3, (MsgType(mt).name, got)
        p.close()
        anon += 1
    w.intact()
    record("isolation", "every data-plane request type from tenant B at A's namespace, keys and lease; "
           "every type without HELLO", len(frames) + anon, len(frames) + anon,
           "refused or answered as misses; A's chunks and lease intact")


def _check_frame_reply(w: World, mt: MsgType, header: dict[str, Any], kind: int, reply: dict[str, Any],
                       out: bytes) -> None:
    name = mt.name
    if kind == MsgType.ERROR:
        assert reply["code"] in (2, 3, 4, 5, 8), (name, reply)  # bad request, unauthorized, forbidden, ns, lease
        return
    assert kind in (MsgType.OK, MsgType.HELLO_OK, MsgType.BUSY), (name, kind, reply)
    assert mt not in (MsgType.HELLO, MsgType.REGISTER, MsgType.RELEASE) or not reply.get("released"), (name, reply)
    assert header.get("ns") != w.ns_a.id, f"{name} on A's namespace was answered: {reply}"
    assert payload(w.keys[0])[:64] not in out, f"{name} returned A's bytes"
    if mt == MsgType.GET:
        assert all(s == -1 for s in reply["sizes"]), reply
    if mt == MsgType.LOOKUP:
        assert reply["hit_tokens"] == 0 and reply.get("lease") is None, reply
    if mt in (MsgType.DELETE, MsgType.CLEAR):
        assert reply.get("deleted", 0) == 0 and reply.get("removed", 0) == 0, reply
    if mt == MsgType.PREFETCH:
        assert reply.get("present", 0) == 0 and reply.get("promoted", 0) == 0, reply
    if mt == MsgType.LIST:
        assert not set(reply["keys"]) & set(w.keys), reply
    if mt == MsgType.SHM_GET:
        assert all(s == -1 for s in reply.get("sizes", [])), reply
    if mt == MsgType.HAVE:
        assert not any(reply["present"]), reply
    if mt == MsgType.ANNOUNCE:  # only in B's own namespace, where A's keys name nothing of A's
        assert set(reply) <= {"announced", "withdrawn"}, reply
    _no_secrets(w, repr(reply), name)


def test_non_loopback_without_tokens_refuses_to_start(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "kvstore.cli", "serve", "--no-disk", "--port", str(free_port()),
            "--admin-port", str(free_port())]
    procs = [subprocess.Popen(base + flags, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
             for flags in (["--host", "0.0.0.0"], ["--admin-host", "0.0.0.0"])]
    for p in procs:
        try:
            out, _ = p.communicate(timeout=60)
        finally:
            p.kill()
        assert p.returncode not in (0, None) and b"token" in out.lower(), out[-500:]
    record("isolation", "non-loopback bind (data plane, admin) without tokens", 2, 2, "refused to start")
