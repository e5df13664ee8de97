"""The daemon stores lower-tier chunks with the codec its config names, and serves them decoded."""

from __future__ import annotations

from pathlib import Path

import lmdb

from tests.service.daemon_fixtures import DaemonProc, chunk_bytes, running


def test_disk_tier_codec_from_config(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    args = ["--tier-codecs", "disk=lossless:level=3"]
    for d in running(DaemonProc(tmp_path / "a", data_dir=data_dir, args=args)):
        ns = d.register("tenant-a")
        keys = d.put_chunks(ns, list(range(48)))
        d.wait_idle()
        assert d.call("GET", "/v1/config").json()["tiers"]["codecs"]["disk"]["codec"] == "lossless"
    env = lmdb.open(str(data_dir), max_dbs=8, readonly=True, lock=False)
    with env.begin() as txn:
        stored = txn.get(bytes.fromhex(keys[0]), db=env.open_db(b"data", txn=txn, create=False))
    env.close()
    assert stored is not None and bytes(stored[:4]) == b"KVC1"  # a codec container on disk
    for d in running(DaemonProc(tmp_path / "b", data_dir=data_dir, args=args)):  # a fresh CPU tier
        ns = d.register("tenant-a")
        for i, key in enumerate(keys):
            reply = d.call("GET", f"/v1/chunks/{ns.id.hex()}/{key}")
            assert reply.status == 200 and reply.body == chunk_bytes(i)  # decoded bit-exact
