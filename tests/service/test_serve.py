"""`kvstore serve` as a real process: it starts, stores, serves, and keeps the disk tier across restarts."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvstore.keys import Namespace, prefix_keys
from kvstore.spec import KVSpec, ModelFingerprint

SPEC = {"tenant": "t1", "model": "m", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "dtype": "float16",
        "chunk_tokens": 16}
NS = Namespace("t1", KVSpec(ModelFingerprint("m"), 2, 2, 8, "float16"), chunk_tokens=16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Daemon:
    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvstore.cli", "serve", "--port", str(self.port), "--data-dir", str(data_dir),
             "--cpu-bytes", "16MiB", "--disk-bytes", "64MiB"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if call(self.url + "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("daemon did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "data")
    yield d
    d.stop()


def test_serve_stores_serves_and_survives_restart(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "data")
    try:
        status, body = call(d.url + "/v1/namespaces", "POST", json.dumps(SPEC).encode())
        assert status == 200 and json.loads(body)["namespace"] == NS.id.hex()
        toks = list(range(40))
        keys = prefix_keys(NS, toks)
        chunks = [np.random.default_rng(i).integers(0, 256, NS.chunk_nbytes, dtype=np.uint8) for i in range(2)]
        for key, chunk in zip(keys, chunks):
            status, _ = call(f"{d.url}/v1/chunks/{NS.id.hex()}/{key.hex()}", "PUT", chunk.tobytes())
            assert status == 201
        status, body = call(f"{d.url}/v1/lookup/{NS.id.hex()}", "POST", json.dumps({"tokens": toks}).encode())
        assert status == 200 and json.loads(body)["hit_tokens"] == 32
        status, body = call(f"{d.url}/v1/chunks/{NS.id.hex()}/{keys[1].hex()}")
        assert status == 200 and body == chunks[1].tobytes()
    finally:
        d.stop()  # SIGTERM: the store flushes its background writes to disk
    d = Daemon(tmp_path / "data")
    try:
        call(d.url + "/v1/namespaces", "POST", json.dumps(SPEC).encode())
        status, body = call(f"{d.url}/v1/chunks/{NS.id.hex()}/{keys[0].hex()}")
        assert status == 200 and body == chunks[0].tobytes()  # served from the disk tier after restart
    finally:
        d.stop()


def test_bad_requests_get_clear_errors(daemon: Daemon) -> None:
    status, body = call(f"{daemon.url}/v1/chunks/{'ab' * 32}/{'cd' * 32}")
    assert status == 404 and b"unknown namespace" in body
    status, body = call(daemon.url + "/v1/namespaces", "POST", b"{not json")
    assert status == 400
    status, body = call(daemon.url + "/v1/namespaces", "POST", json.dumps({**SPEC, "dtype": "float13"}).encode())
    assert status == 400 and b"dtype" in body
    call(daemon.url + "/v1/namespaces", "POST", json.dumps(SPEC).encode())
    status, body = call(f"{daemon.url}/v1/chunks/{NS.id.hex()}/zz", "PUT", b"x")
    assert status == 400 and b"hex" in body
    status, body = call(f"{daemon.url}/v1/chunks/{NS.id.hex()}/{'00' * 32}")
    assert status == 404
    assert call(daemon.url + "/healthz")[0] == 200  # still serving


def test_non_loopback_bind_refused(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvstore.cli", "serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2 and "loopback" in out.stderr
