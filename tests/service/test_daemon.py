"""The daemon: its config layers, and as a real process: drain on SIGTERM, restart, Redis loss, bind policy."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvstore.checksum import checksum
from kvstore.service.config import DaemonConfig, InsecureBind, redact_url
from kvstore.service.config_load import OPTIONS, load_config
from kvstore.service.protocol import PREFIX_BYTES, MsgType, decode_header, frame, unpack_prefix
from tests.redis_servers import RedisServer
from tests.service.daemon_fixtures import DaemonProc, chunk_bytes, metric_value, running

# -- config layers (in process) ------------------------------------------------------------


def test_layers_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "kvstore.toml"
    cfg.write_text(
        '[tiers]\ncpu_bytes = "64MiB"\ndisk_bytes = "1GiB"\npolicy = "lfu"\n'
        '[admin]\nport = 9001\n[data_plane]\nport = 9000\nshm = false\n[logging]\nlevel = "debug"\n'
    )
    env = {"KVSTORE_CPU_BYTES": "32MiB", "KVSTORE_ADMIN_PORT": "9002", "KVSTORE_LEASE_TTL_S": "5"}
    config = load_config(env, {"tiers__cpu_bytes": "16MiB"}, str(cfg))
    assert config.tiers.cpu_bytes == 16 << 20  # flag beats environment and file
    assert config.admin.port == 9002  # environment beats file
    assert config.tiers.disk_bytes == 1 << 30 and config.tiers.policy == "lfu"  # file beats defaults
    assert config.data_plane.port == 9000 and config.data_plane.shm is False
    assert config.store.lease_ttl_s == 5.0 and config.logging.level == "debug"
    default = load_config({}, {})
    assert default == DaemonConfig()  # the embedded default: CPU + LMDB under ./kvstore-data, no Redis
    assert default.tiers.data_dir == "./kvstore-data" and default.tiers.redis_url is None
    assert default.admin.host == default.data_plane.host == "127.0.0.1"
    assert load_config({"KVSTORE_CONFIG": str(cfg)}, {}).tiers.policy == "lfu"
    assert load_config({}, {"tiers__data_dir": ""}).tiers.data_dir is None  # '' means no disk tier


def test_yaml_file_and_unknown_keys(tmp_path: Path) -> None:
    yml = tmp_path / "kvstore.yaml"
    yml.write_text(
        "tiers:\n  cpu_bytes: 8MiB\n  redis_url: redis://:hunter2@127.0.0.1:6379/0\nadmin:\n  port: 7000\n"
    )
    config = load_config({}, {}, str(yml))
    assert config.tiers.cpu_bytes == 8 << 20 and config.admin.port == 7000
    assert "hunter2" not in json.dumps(config.redacted())
    bad = tmp_path / "bad.toml"
    bad.write_text("[tiers]\ncpu_bytez = 1\n")
    with pytest.raises(ValueError, match="tiers.cpu_bytez"):
        load_config({}, {}, str(bad))
    bad.write_text("[tierz]\n")
    with pytest.raises(ValueError, match="tierz"):
        load_config({}, {}, str(bad))
    bad.write_text('[tiers]\ndisk_sync = "sometimes"\n')
    with pytest.raises(ValueError, match="disk_sync"):
        load_config({}, {}, str(bad))
    with pytest.raises(ValueError, match="KVSTORE_ADMIN_PORT"):
        load_config({"KVSTORE_ADMIN_PORT": "seven"}, {})
    with pytest.raises(ValueError, match="both 7000"):
        load_config({}, {"admin__port": "7000", "data_plane__port": "7000"})


def test_every_option_has_a_unique_env_name_and_a_real_field() -> None:
    envs = [o.env for o in OPTIONS]
    assert len(envs) == len(set(envs)) and all(e.startswith("KVSTORE_") for e in envs)
    for o in OPTIONS:
        assert hasattr(getattr(DaemonConfig(), o.section), o.name) or o.name == "tokens_file"


def test_tokens_file_env_tokens_and_bind_policy(tmp_path: Path) -> None:
    with pytest.raises(InsecureBind, match="loopback"):
        load_config({}, {"data_plane__host": "0.0.0.0"})
    with pytest.raises(InsecureBind, match="admin"):
        load_config({"KVSTORE_ADMIN_HOST": "10.1.2.3"}, {})
    tokens = tmp_path / "tokens"
    tokens.write_text("# token tenant\naaaaaaaaaaaaaaaaaaaa tenant-a\nbbbbbbbbbbbbbbbbbbbb *\n")
    tokens.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_config({}, {"auth__tokens_file": str(tokens)})
    tokens.chmod(0o600)
    config = load_config(
        {"KVSTORE_TOKENS": "cccccccccccccccccccc:tenant-c"},
        {"auth__tokens_file": str(tokens), "data_plane__host": "0.0.0.0"},
    )
    assert config.auth.tenant_of("aaaaaaaaaaaaaaaaaaaa") == "tenant-a"
    assert config.auth.tenant_of("cccccccccccccccccccc") == "tenant-c"
    assert config.auth.tenant_of("nope") is None
    assert config.auth.data_plane_tokens() == {
        "aaaaaaaaaaaaaaaaaaaa": "tenant-a",
        "cccccccccccccccccccc": "tenant-c",
    }
    text = json.dumps(config.redacted()) + repr(config)
    assert "aaaaaaaaaaaaaaaaaaaa" not in text and "cccccccccccccccccccc" not in text
    assert "tenants" not in json.dumps(config.redacted("tenant-a")["auth"])
    with pytest.raises(ValueError, match="16-256"):
        load_config({"KVSTORE_TOKENS": "short:tenant"}, {})
    with pytest.raises(ValueError, match="listed twice"):
        load_config({"KVSTORE_TOKENS": "aaaaaaaaaaaaaaaaaaaa:x,aaaaaaaaaaaaaaaaaaaa:y"}, {})
    assert redact_url("redis://user:pw@host:6380/1") == "redis://user:***@host:6380/1"
    admin_only = {"KVSTORE_TOKENS": "dddddddddddddddddddd:*"}  # admin tokens are not valid on the data plane
    with pytest.raises(InsecureBind, match="data plane"):
        load_config(admin_only, {"data_plane__host": "0.0.0.0"})
    assert load_config(admin_only, {"admin__host": "0.0.0.0"}).admin.host == "0.0.0.0"


def test_cli_refuses_non_loopback_without_tokens(tmp_path: Path) -> None:
    for flag in ("--host",):  # (the admin listener's refusal is checked in process above)
        out = subprocess.run(
            [sys.executable, "-m", "kvstore.cli", "serve", flag, "0.0.0.0", "--data-dir", str(tmp_path)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2 and "loopback" in out.stderr and "tokens" in out.stderr, out.stderr
    assert not any(tmp_path.iterdir())  # refused before opening anything


# -- the daemon as a process ---------------------------------------------------------------


def _slow_put(port: int, path: str, body: bytes) -> socket.socket:
    """Open a PUT whose body has only begun to arrive (the rest follows with _finish_put)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    sock.sendall(head.encode() + body[:256])
    return sock


def _finish_put(sock: socket.socket, rest: bytes) -> bytes:
    for i in range(0, len(rest), 512):
        sock.sendall(rest[i : i + 512])
        time.sleep(0.1)
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    sock.close()
    return reply


def _slow_dp_put(port: int, ns_id: bytes, key: bytes, data: bytes) -> socket.socket:
    """A data-plane PUT frame whose payload has only begun to arrive."""
    header = {"ns": ns_id, "keys": [key], "sizes": [len(data)], "checksums": [checksum(data)]}
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(frame(MsgType.PUT, 7, header, len(data)) + data[:256])
    return sock


def _finish_dp_put(sock: socket.socket, rest: bytes) -> tuple[int, dict[str, object]]:
    for i in range(0, len(rest), 512):
        sock.sendall(rest[i : i + 512])
        time.sleep(0.1)
    raw = b""
    while len(raw) < PREFIX_BYTES:
        raw += sock.recv(PREFIX_BYTES - len(raw))
    prefix = unpack_prefix(raw, 1 << 20)
    body = b""
    while len(body) < prefix.header_len:
        body += sock.recv(prefix.header_len - len(body))
    sock.close()
    return prefix.type, decode_header(body)


def test_sigterm_drains_flushes_and_restart_keeps_the_disk_tier(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path, name="first").start()
    assert d.proc is not None
    try:
        ns = d.register("t1")
        keys = d.put_chunks(ns, list(range(40)))  # 2 full chunks
        assert d.call("GET", "/readyz").status == 200
        slow_key = "ab" * 32
        sock = _slow_put(d.admin_port, f"/v1/chunks/{ns.id.hex()}/{slow_key}", chunk_bytes(9))
        dp_sock = (
            _slow_dp_put(d.port, ns.id, bytes.fromhex("ef" * 32), chunk_bytes(10)) if d.data_plane else None
        )
        time.sleep(0.3)  # both handlers are now reading their bodies
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert d.proc.poll() is None  # still draining the slow requests
        reply = _finish_put(sock, chunk_bytes(9)[256:])
        assert reply.startswith(b"HTTP/1.1 201"), reply[:200]
        if dp_sock is not None:
            kind, header = _finish_dp_put(dp_sock, chunk_bytes(10)[256:])
            assert kind == MsgType.OK and header["stored"] == [True], header
        assert d.wait() == 0
    finally:
        d.kill()
    records = d.log_records()  # every line is one JSON object
    msgs = [r["msg"] for r in records]
    assert {"starting", "store open", "admin listening", "signal received", "store closed", "stopped"} <= set(
        msgs
    )
    assert msgs.index("signal received") < msgs.index("store closed") < msgs.index("stopped")
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)

    for d2 in running(DaemonProc(tmp_path, name="second")):
        stats = d2.call("GET", "/v1/stats").json()
        disk = next(t for t in stats["tiers"] if t["name"] == "disk")
        # the chunks and the drained slow puts reached the disk before the first daemon exited
        assert disk["entries"] == 3 + d.data_plane
        # the namespace came back from the catalog beside the disk tier: no client registered it
        listed = d2.call("GET", "/v1/stats").json()
        assert listed["namespaces"] >= 1
        for i, key in enumerate(keys):
            got = d2.call("GET", f"/v1/chunks/{ns.id.hex()}/{key}")
            assert got.status == 200 and got.body == chunk_bytes(i)
        assert d2.call("GET", f"/v1/chunks/{ns.id.hex()}/{slow_key}").body == chunk_bytes(9)
        hit = d2.call("POST", "/v1/lookup", {"namespace": ns.id.hex(), "tokens": list(range(40))}).json()
        assert hit["hit_tokens"] == 32
        ready = d2.call("GET", "/readyz").json()
        assert ready["checks"]["data_plane"] is (True if d2.data_plane else "disabled")
        if d2.data_plane:
            assert d2.call("GET", f"/v1/chunks/{ns.id.hex()}/{'ef' * 32}").body == chunk_bytes(10)


def test_redis_going_away_is_reported_and_the_daemon_keeps_serving(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    for d in running(DaemonProc(tmp_path, args=["--redis-url", redis_server.url])):
        ns = d.register("t1")
        keys = d.put_chunks(ns, list(range(48)))
        d.wait_idle()
        ready = d.call("GET", "/readyz")
        assert ready.status == 200 and ready.json()["checks"]["tiers"] == {
            "cpu": True,
            "disk": True,
            "redis": True,
        }
        redis_server.kill()
        absent = "cd" * 32
        assert d.call("GET", f"/v1/chunks/{ns.id.hex()}/{absent}").status == 404  # asks Redis: down
        ready = d.call("GET", "/readyz")
        assert ready.status == 503 and ready.json()["checks"]["tiers"]["redis"] is False
        metrics = d.call("GET", "/metrics").body.decode()
        down = metric_value(metrics, "kvstore_tier_misses_total", tier="redis", reason="remote_down")
        assert down is not None and down >= 1
        assert metric_value(metrics, "kvstore_tier_up", tier="redis") == 0.0
        for i, key in enumerate(keys):  # still served from the CPU tier
            reply = d.call("GET", f"/v1/chunks/{ns.id.hex()}/{key}")
            assert reply.status == 200 and reply.body == chunk_bytes(i)
        assert d.put_chunks(ns, list(range(64)), seed=0)  # and still takes writes
        stats = d.call("GET", "/v1/stats").json()
        assert next(t for t in stats["tiers"] if t["name"] == "redis")["up"] is False
        redis_server.start()
        deadline = time.monotonic() + 20
        while d.call("GET", "/readyz").status != 200:
            assert time.monotonic() < deadline, "readyz did not recover after Redis came back"
            time.sleep(0.2)
