"""`kvstore inspect FILE` prints a container, and says clearly when it is not one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import kvstore.codecs  # noqa: F401
from kvstore.codecs.base import ChunkLayout, make_codec
from kvstore.spec import KVSpec, ModelFingerprint
from tests.redis_servers import RedisServer


def test_inspect_command(tmp_path: Path) -> None:
    spec = KVSpec(ModelFingerprint("m"), 2, 2, 8, "float16")
    raw = np.random.default_rng(0).standard_normal(spec.chunk_shape(16)).astype(np.float16)
    blob = make_codec("lossless").encode(raw.view(np.uint8).reshape(-1), ChunkLayout(spec, 16))
    good = tmp_path / "chunk.kvc"
    good.write_bytes(blob)
    out = subprocess.run([sys.executable, "-m", "kvstore.cli", "inspect", str(good)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lossless" in out.stdout and "16 tokens" in out.stdout
    bad = tmp_path / "bad.kvc"
    bad.write_bytes(blob[:-7])
    out = subprocess.run([sys.executable, "-m", "kvstore.cli", "inspect", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvstore.cli", "inspect", *args],
                          capture_output=True, text=True, timeout=120)


def test_inspect_key_reads_the_records_of_the_disk_and_remote_tiers(tmp_path: Path, redis_server: RedisServer) -> None:
    import json

    import lmdb

    from kvstore.builder import TiersConfig, build_store
    from kvstore.keys import Namespace, prefix_keys
    from kvstore.tiers.tier_codecs import CodecChoice

    spec = KVSpec(ModelFingerprint("m"), 2, 2, 8, "float16")
    ns = Namespace("t", spec, chunk_tokens=16)
    raw = np.random.default_rng(1).standard_normal(spec.chunk_shape(16)).astype(np.float16).view(np.uint8).reshape(-1)
    key = prefix_keys(ns, np.arange(16, dtype=np.uint32))[0]
    config = TiersConfig(
        cpu_bytes=1 << 20, data_dir=str(tmp_path / "data"), disk_bytes=8 << 20, redis_url=redis_server.url,
        codecs={"disk": CodecChoice("lossless"), "redis": CodecChoice("quant", {"bits": 8})},
    )
    store = build_store(config)
    try:
        store.register_namespace(ns)
        store.put(ns, key, raw)
        store.flush()
    finally:
        store.close()

    out = _cli(key.hex(), "--data-dir", str(tmp_path / "data"), "--redis-url", redis_server.url, "--decode")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "== disk" in out.stdout and "== redis" in out.stdout and ns.id.hex() in out.stdout
    assert "lossless" in out.stdout and "quant" in out.stdout and "checksum ok" in out.stdout
    got = json.loads(_cli(key.hex(), "--data-dir", str(tmp_path / "data"), "--redis-url", redis_server.url,
                          "--json").stdout)
    assert [r["container"]["codec"] for r in got] == ["lossless", "quant"]
    assert all(r["intact"] and r["namespace"] == ns.id.hex() for r in got)
    assert got[0]["container"]["raw_bytes"] == raw.size

    # a flipped payload byte on disk: reported, exit 1, no traceback
    env = lmdb.open(str(tmp_path / "data"), max_dbs=3)
    with env.begin(write=True) as txn:
        db = env.open_db(b"data", txn=txn)
        payload = bytearray(txn.get(bytes(key), db=db))
        payload[-1] ^= 0xFF
        txn.put(bytes(key), bytes(payload), db=db)
    env.close()
    bad = _cli(key.hex(), "--data-dir", str(tmp_path / "data"))
    assert bad.returncode == 1 and "checksum BAD" in bad.stdout and "Traceback" not in bad.stderr

    absent = _cli("00" * 32, "--data-dir", str(tmp_path / "data"))
    assert absent.returncode == 1 and "no record" in absent.stderr
    for wrong in (("zz", "--data-dir", str(tmp_path / "data")), (key.hex(), "--data-dir", str(tmp_path / "none"))):
        r = _cli(*wrong)
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip(), r.stderr
