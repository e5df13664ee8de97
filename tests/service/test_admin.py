"""The admin HTTP API against a real daemon with auth: every endpoint, tenant isolation, bad requests."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from openapi_spec_validator import validate

from kvstore.errors import UnknownNamespace
from kvstore.keys import Namespace, prefix_keys
from kvstore.service.admin import PUBLIC_PATHS, make_admin_app
from kvstore.service.admin_openapi import openapi_document
from kvstore.service.config import DaemonConfig
from tests.service.daemon_fixtures import (
    ADMIN_TOKEN,
    HAVE_DATAPLANE,
    SPEC,
    TOKEN_A,
    TOKEN_B,
    TOKENS,
    DaemonProc,
    chunk_bytes,
    metric_value,
    namespace,
    running,
)

NS_A, NS_B = namespace("tenant-a"), namespace("tenant-b")
JSON, PLAIN = {"Content-Type": "application/json"}, {"Content-Type": "text/plain"}
TOKS = list(range(48))  # 3 full chunks of 16 tokens


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    """One daemon with tokens for tenant-a, tenant-b and an admin; each tenant stored 3 chunks."""
    for d in running(DaemonProc(tmp_path_factory.mktemp("admin"), tokens=TOKENS)):
        d.register("tenant-a", TOKEN_A)
        d.register("tenant-b", TOKEN_B)
        d.put_chunks(NS_A, TOKS, TOKEN_A, seed=0)
        d.put_chunks(NS_B, TOKS, TOKEN_B, seed=100)
        d.wait_idle(ADMIN_TOKEN)
        yield d


def keys_of(ns: Namespace) -> list[str]:
    return [k.hex() for k in prefix_keys(ns, TOKS)]


def test_openapi_document_is_valid_and_names_every_route(daemon: DaemonProc) -> None:
    served = daemon.call("GET", "/openapi.json")
    assert served.status == 200
    doc = served.json()
    validate(doc)
    schemas = doc["components"]["schemas"]
    tiers = schemas["EvictRequest"]["properties"]["tier"]["enum"]  # the running daemon's tiers
    raw = schemas["MoveRequest"]["properties"]["from"].get("enum", [])
    assert "cpu" in tiers and set(raw) <= set(tiers)
    assert doc == openapi_document(tiers, raw)
    validate(openapi_document())  # without a store: tier names are free strings
    app = make_admin_app(DaemonConfig())
    routes = {
        (r.method.lower(), r.resource.canonical)
        for r in app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    documented = {(m, p) for p, item in doc["paths"].items() for m in item if m != "parameters"}
    assert routes == documented


def test_every_endpoint_needs_a_valid_token(daemon: DaemonProc) -> None:
    doc = openapi_document()
    for path, item in doc["paths"].items():
        concrete = (
            path.replace("{ns}", NS_A.id.hex()).replace("{key}", keys_of(NS_A)[0]).replace("{lease}", "1")
        )
        for method in (m for m in item if m != "parameters"):
            for token in (None, "wrong-token-000000000000"):
                reply = daemon.call(method.upper(), concrete, b"{}", token)
                if path in PUBLIC_PATHS:
                    assert reply.status in (200, 503), (path, reply)
                else:
                    assert reply.status == 401, (method, path, reply)
                    assert reply.headers["www-authenticate"].startswith("Bearer")
                    assert "error" in reply.json()
    assert daemon.call("GET", "/v1/stats", headers={"Authorization": f"Basic {TOKEN_A}"}).status == 401


def test_a_tenant_cannot_reach_another_tenants_namespace(daemon: DaemonProc) -> None:
    a_hex = NS_A.id.hex()
    key_a = keys_of(NS_A)[0]
    attempts: list[tuple[str, str, Any]] = [
        ("POST", "/v1/lookup", {"namespace": a_hex, "tokens": TOKS}),
        ("POST", "/v1/pin", {"namespace": a_hex, "keys": [key_a]}),
        ("POST", "/v1/evict", {"namespace": a_hex}),
        ("POST", "/v1/evict", {"namespace": a_hex, "keys": [key_a], "tier": "cpu"}),
        ("POST", "/v1/clear", {"namespace": a_hex}),
        ("POST", "/v1/move", {"namespace": a_hex, "keys": [key_a], "from": "cpu", "to": "disk"}),
        ("GET", f"/v1/chunks/{a_hex}/{key_a}", None),
        ("PUT", f"/v1/chunks/{a_hex}/{key_a}", chunk_bytes(5)),
    ]
    unknown = "ee" * 32
    for method, path, body in attempts:
        theirs = daemon.call(method, path, body, TOKEN_B)
        absent = daemon.call(
            method,
            path.replace(a_hex, unknown),
            body and {**body, "namespace": unknown} if isinstance(body, dict) else body,
            TOKEN_B,
        )
        assert theirs.status == 404 and absent.status == 404, (path, theirs)
        # another tenant's namespace looks exactly like an unknown one
        assert str(theirs.json()["error"]).replace(a_hex[:16], "?") == str(absent.json()["error"]).replace(
            unknown[:16], "?"
        )
    reply = daemon.call("POST", "/v1/namespaces", {**SPEC, "tenant": "tenant-a"}, TOKEN_B)
    assert reply.status == 403
    _tenant_a_is_intact(daemon)


def test_a_tenant_cannot_touch_another_tenants_chunks_through_its_own_namespace(daemon: DaemonProc) -> None:
    b_hex, a_keys = NS_B.id.hex(), keys_of(NS_A)
    r = daemon.call("POST", "/v1/lookup", {"namespace": b_hex, "keys": a_keys}, TOKEN_B).json()
    assert r["hit_chunks"] == 0 and r["chunks"] == []
    r = daemon.call("POST", "/v1/pin", {"namespace": b_hex, "keys": a_keys}, TOKEN_B).json()
    assert r["lease"] is None and r["pinned"] == [] and sorted(r["missing"]) == sorted(a_keys)
    for tier in (None, "cpu", "disk"):
        body = {"namespace": b_hex, "keys": a_keys, **({"tier": tier} if tier else {})}
        assert daemon.call("POST", "/v1/evict", body, TOKEN_B).json() == {"evicted": 0}
    r = daemon.call(
        "POST",
        "/v1/move",
        {"namespace": b_hex, "keys": a_keys, "from": "cpu", "to": "disk", "remove_source": True},
        TOKEN_B,
    ).json()
    assert r["moved"] == [] and len(r["missing"]) == 3
    assert daemon.call("GET", f"/v1/chunks/{b_hex}/{a_keys[0]}", token=TOKEN_B).status == 404
    assert daemon.call("PUT", f"/v1/chunks/{b_hex}/{a_keys[0]}", chunk_bytes(7), TOKEN_B).status == 409
    _tenant_a_is_intact(daemon)


def test_listings_and_stats_are_scoped_to_the_tenant(daemon: DaemonProc) -> None:
    lease = daemon.call(
        "POST", "/v1/pin", {"namespace": NS_A.id.hex(), "keys": keys_of(NS_A)}, TOKEN_A
    ).json()
    assert lease["lease"] is not None and len(lease["pinned"]) == 3
    try:
        spaces = daemon.call("GET", "/v1/namespaces", token=TOKEN_B).json()["namespaces"]
        assert [n["namespace"] for n in spaces] == [NS_B.id.hex()]
        every = daemon.call("GET", "/v1/namespaces", token=ADMIN_TOKEN).json()["namespaces"]
        assert {n["namespace"] for n in every} == {NS_A.id.hex(), NS_B.id.hex()}
        assert daemon.call("GET", "/v1/leases", token=TOKEN_B).json() == {"leases": []}
        mine = daemon.call("GET", "/v1/leases", token=TOKEN_A).json()["leases"]
        assert [l["lease"] for l in mine] == [lease["lease"]]
        assert mine[0]["chunks"] == 3 and mine[0]["namespace"] == NS_A.id.hex()
        assert daemon.call("DELETE", f"/v1/leases/{lease['lease']}", token=TOKEN_B).status == 404
        stats_b = daemon.call("GET", "/v1/stats", token=TOKEN_B).json()
        assert stats_b["scope"] == "tenant" and stats_b["tenant"] == "tenant-b"
        assert [n["namespace"] for n in stats_b["namespaces"]] == [NS_B.id.hex()]
        cpu = next(t for t in stats_b["tiers"] if t["name"] == "cpu")
        assert cpu["entries"] == 3 and cpu["used_bytes"] >= 3 * 2048
        for path in ("/metrics", "/v1/history"):
            assert daemon.call("GET", path, token=TOKEN_B).status == 403
            assert daemon.call("GET", path, token=ADMIN_TOKEN).status == 200
        conf_b = daemon.call("GET", "/v1/config", token=TOKEN_B).json()
        assert conf_b["auth"] == {"enabled": True, "tokens_file": conf_b["auth"]["tokens_file"]}
        conf = daemon.call("GET", "/v1/config", token=ADMIN_TOKEN).json()
        assert conf["auth"]["tenants"] == ["*", "tenant-a", "tenant-b"]
        assert not any(t in str(conf) + str(conf_b) for t in TOKENS)
    finally:
        assert daemon.call("DELETE", f"/v1/leases/{lease['lease']}", token=TOKEN_A).json() == {
            "released": True
        }
    assert daemon.call("GET", "/v1/leases", token=TOKEN_A).json() == {"leases": []}


def test_lookup_pin_move_evict_clear(daemon: DaemonProc) -> None:
    t = ADMIN_TOKEN
    d = daemon.register("tenant-c", t)
    keys = daemon.put_chunks(d, TOKS, t, seed=200)
    daemon.wait_idle(t)
    h = d.id.hex()
    r = daemon.call(
        "POST", "/v1/lookup", {"namespace": h, "tokens": TOKS + [1, 2, 3], "lease": True}, t
    ).json()
    assert r["hit_tokens"] == 48 and r["query_chunks"] == 3 and r["lease"] is not None
    assert [c["tiers"] for c in r["chunks"]] == [["cpu", "disk"]] * 3
    assert daemon.call("DELETE", f"/v1/leases/{r['lease']}", token=t).json() == {"released": True}
    r = daemon.call("POST", "/v1/evict", {"namespace": h, "keys": keys[:2], "tier": "cpu"}, t).json()
    assert r == {"evicted": 2}
    r = daemon.call("POST", "/v1/lookup", {"namespace": h, "keys": keys}, t).json()
    assert [c["tier"] for c in r["chunks"]] == ["disk", "disk", "cpu"]
    r = daemon.call(
        "POST", "/v1/move", {"namespace": h, "keys": keys[:1], "from": "disk", "to": "cpu"}, t
    ).json()
    assert r == {"moved": [keys[0]], "missing": [], "rejected": []}
    r = daemon.call("POST", "/v1/lookup", {"namespace": h, "keys": keys}, t).json()
    assert [c["tiers"] for c in r["chunks"]] == [["cpu", "disk"], ["disk"], ["cpu", "disk"]]
    assert daemon.call("GET", f"/v1/chunks/{h}/{keys[1]}", token=t).body == chunk_bytes(201)  # from disk
    r = daemon.call("POST", "/v1/evict", {"namespace": h, "keys": keys[2:]}, t).json()
    assert r == {"evicted": 1}
    assert daemon.call("POST", "/v1/clear", {"namespace": h}, t).json()["removed"] >= 2
    r = daemon.call("POST", "/v1/lookup", {"namespace": h, "tokens": TOKS}, t).json()
    assert r["hit_chunks"] == 0
    metrics = daemon.call("GET", "/metrics", token=t).body.decode()
    assert metric_value(metrics, "kvstore_tier_entries", tier="cpu") is not None
    for reason in ("absent", "evicted", "expired", "corrupt", "remote_down", "too_small"):
        assert metric_value(metrics, "kvstore_tier_misses_total", tier="disk", reason=reason) is not None
    assert (metric_value(metrics, "kvstore_leases_granted_total") or 0) >= 1
    assert "kvstore_admin_request_seconds_bucket" in metrics and "kvstore_writer_queue_depth" in metrics
    _tenant_a_is_intact(daemon)


def test_bad_requests_get_json_errors_and_the_daemon_keeps_serving(daemon: DaemonProc) -> None:
    t, h = TOKEN_A, NS_A.id.hex()
    big = b'{"namespace": "' + b"0" * (2 << 20) + b'"}'
    cases = [
        (daemon.call("POST", "/v1/lookup", big, t, headers=JSON), 413),
        (daemon.call("POST", "/v1/lookup", b"{not json", t, headers=JSON), 400),
        (daemon.call("POST", "/v1/lookup", b"[1, 2]", t, headers=JSON), 400),
        (daemon.call("POST", "/v1/lookup", b"", t, headers=JSON), 400),
        (daemon.call("POST", "/v1/clear", b'{"namespace": "%s"}' % h.encode(), t, headers=PLAIN), 415),
        (daemon.call("POST", "/v1/lookup", {"namespace": h, "tokens": "1 2 3"}, t), 400),
        (daemon.call("POST", "/v1/lookup", {"namespace": h, "tokens": [-1]}, t), 400),
        (daemon.call("POST", "/v1/lookup", {"namespace": "zz", "tokens": [1]}, t), 400),
        (daemon.call("POST", "/v1/lookup", {"namespace": "ab" * 32, "tokens": [1]}, t), 404),
        (daemon.call("POST", "/v1/pin", {"namespace": h, "keys": ["xyz"]}, t), 400),
        (daemon.call("POST", "/v1/pin", {"namespace": h, "keys": keys_of(NS_A), "ttl_s": -1}, t), 400),
        (
            daemon.call(
                "POST", "/v1/move", {"namespace": h, "keys": keys_of(NS_A), "from": "cpu", "to": "tape"}, t
            ),
            400,
        ),
        (daemon.call("POST", "/v1/evict", {"namespace": h, "tier": "tape"}, t), 400),
        (daemon.call("POST", "/v1/namespaces", {**SPEC, "dtype": "float13"}, t), 400),
        (daemon.call("DELETE", "/v1/leases/x", token=t), 400),
        (daemon.call("DELETE", "/v1/leases/123456", token=t), 404),
        (daemon.call("GET", "/v1/nothing", token=t), 404),
        (daemon.call("DELETE", "/v1/stats", token=t), 405),
        (daemon.call("PUT", f"/v1/chunks/{h}/{'00' * 32}", b"x" * (256 << 20 | 1), t), 413),
    ]
    for reply, status in cases:
        assert reply.status == status, reply
        assert reply.headers["content-type"].startswith("application/json") and reply.json()["error"]
    assert _chunked_post(daemon.admin_port, "/v1/lookup", 2 << 20, t).startswith(b"HTTP/1.1 413")
    assert daemon.call("GET", "/healthz").status == 200
    _tenant_a_is_intact(daemon)


def _chunked_post(port: int, path: str, nbytes: int, token: str) -> bytes:
    """A POST without Content-Length (chunked) whose body exceeds the limit."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
        )
        piece = b"0" * 65536
        try:
            for _ in range(nbytes // len(piece)):
                sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the daemon may answer and close before the body ends
        return sock.recv(65536)


def _tenant_a_is_intact(daemon: DaemonProc) -> None:
    for i, key in enumerate(keys_of(NS_A)):
        reply = daemon.call("GET", f"/v1/chunks/{NS_A.id.hex()}/{key}", token=TOKEN_A)
        assert reply.status == 200 and reply.body == chunk_bytes(i)


@pytest.mark.skipif(not HAVE_DATAPLANE, reason="kvstore.service.dataplane is not there yet")
def test_tokens_reach_the_data_plane_and_its_latencies_reach_the_metrics(daemon: DaemonProc) -> None:
    from kvstore.client.sync import Client
    from kvstore.service.protocol import Unauthorized

    url = f"kvstore://127.0.0.1:{daemon.port}"
    with Client.connect(url, token=TOKEN_A, retries=0) as kv:
        hit = kv.lookup(NS_A, TOKS)  # the chunks tenant-a put through the admin API
        assert hit.hit_tokens == 48
        kv.release(hit)
    with Client.connect(url, token=TOKEN_B, retries=0) as kv, pytest.raises(UnknownNamespace):
        kv.lookup(NS_A, TOKS)
    for token in (ADMIN_TOKEN, None):  # the admin token is for the admin API only
        with pytest.raises(Unauthorized):
            Client.connect(url, token=token, retries=0)
    metrics = daemon.call("GET", "/metrics", token=ADMIN_TOKEN).body.decode()
    assert (metric_value(metrics, "kvstore_request_seconds_count", type="LOOKUP", outcome="ok") or 0) >= 1
    assert (metric_value(metrics, "kvstore_request_seconds_count", type="LOOKUP", outcome="error") or 0) >= 1
    stats = daemon.call("GET", "/v1/stats", token=ADMIN_TOKEN).json()
    assert stats["requests"]["LOOKUP"]["count"] >= 2
    assert stats["data_plane"]["requests"]["LOOKUP"] >= 2
