"""Corruption: random bytes flipped in LMDB values (daemon stopped) and in Redis values (SETRANGE).

Every corrupted chunk must be detected and counted as a ``corrupt`` miss,
never returned; every untouched chunk still reads back byte-exact. The fast
run corrupts one batch per tier; ``-m slow`` repeats it over 20 rounds.
"""

from __future__ import annotations

import random
from pathlib import Path

import lmdb
import pytest

from kvstore.client import Client
from kvstore.keys import Namespace
from kvstore.tiers.disk_config import DiskTierConfig
from tests.redis_servers import RedisServer
from tests.resilience.common import client, daemon, key_of, misses, payload, record, verify_all
from tests.service.daemon_fixtures import ADMIN_TOKEN, DaemonProc, namespace, running

CHUNKS, BAD = 48, 12


def _flip(raw: bytes, rng: random.Random) -> bytes:
    """1 to 4 bytes XORed with a non-zero value at random offsets."""
    out = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(len(out))] ^= rng.randint(1, 255)
    return bytes(out)


def _put(c: Client, ns: Namespace, tag: str) -> list[bytes]:
    keys = [key_of(tag, i) for i in range(CHUNKS)]
    assert all(c.put_many(ns, keys, [payload(k) for k in keys]))
    return list(keys)


def _corrupt_lmdb(path: Path, keys: list[bytes], rng: random.Random) -> None:
    env = lmdb.open(str(path), max_dbs=3, map_size=DiskTierConfig(str(path), 64 << 20).map_size)
    try:
        data = env.open_db(b"data")
        with env.begin(write=True) as txn:
            for k in keys:
                raw = txn.get(k, db=data)
                assert raw is not None, "the chunk is not on disk"
                txn.put(k, _flip(bytes(raw), rng), db=data)
    finally:
        env.close()


def _check(d: DaemonProc, c: Client, ns: Namespace, keys: list[bytes], bad: list[bytes], tier: str,
           before: float) -> None:
    returned, missed = verify_all(c, ns, keys)  # fails on any wrong byte handed out
    assert (returned, missed) == (len(keys) - len(bad), len(bad))
    for k in bad:
        assert verify_all(c, ns, [k]) == (0, 1), "a corrupted chunk came back"
    assert misses(d, tier, "corrupt") - before == len(bad)


def run_lmdb(tmp_path: Path, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    d = daemon(tmp_path, "--disk-bytes", "64MiB", data_dir=tmp_path / "data")
    detected = 0
    try:
        for r in range(rounds):
            d.start()
            with client(d) as c:
                keys = _put(c, c.register(namespace("tenant-a")), f"lmdb-{seed}-{r}")
            d.wait_idle(ADMIN_TOKEN)
            d.stop()
            bad = rng.sample(keys, BAD)
            _corrupt_lmdb(d.data_dir, bad, rng)
            d.start()  # the CPU tier starts empty: every read goes to disk
            with client(d) as c:
                _check(d, c, c.register(namespace("tenant-a")), keys, bad, "disk", 0)
            d.stop()
            detected += BAD
    finally:
        d.kill()
        record("corruption", "bytes flipped in LMDB payloads (daemon stopped), then read", rounds * BAD,
               detected, "each detected as a corrupt miss, never returned; untouched chunks byte-exact")


def run_redis(tmp_path: Path, redis: RedisServer, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    detected = 0
    try:
        for up in running(daemon(tmp_path, "--no-disk", "--redis-url", redis.url)):
            with client(up) as c:
                ns = c.register(namespace("tenant-a"))
                for r in range(rounds):
                    keys = _put(c, ns, f"redis-{seed}-{r}")
                    up.wait_idle(ADMIN_TOKEN)
                    assert up.call("POST", "/v1/evict", {"namespace": ns.id.hex(), "tier": "cpu"},
                                   ADMIN_TOKEN).status == 200
                    bad = rng.sample(keys, BAD)
                    with redis.client() as rc:
                        names = {n[-64:].decode(): n for n in rc.scan_iter(count=1000)}
                        for k in bad:
                            name = names[k.hex()]
                            size = int(rc.strlen(name))
                            for _ in range(rng.randint(1, 4)):
                                off = rng.randrange(size)
                                old = rc.getrange(name, off, off)
                                rc.setrange(name, off, bytes([old[0] ^ rng.randint(1, 255)]))
                    _check(up, c, ns, keys, bad, "redis", misses(up, "redis", "corrupt"))
                    detected += BAD
    finally:
        record("corruption", "bytes flipped in Redis values (SETRANGE), then read", rounds * BAD, detected,
               "each detected as a corrupt miss, never returned; untouched chunks byte-exact")


def test_lmdb_corruption_fast(tmp_path: Path) -> None:
    run_lmdb(tmp_path, rounds=1, seed=1)


def test_redis_corruption_fast(tmp_path: Path, redis_server: RedisServer) -> None:
    run_redis(tmp_path, redis_server, rounds=2, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_lmdb_corruption_rounds(tmp_path: Path) -> None:
    run_lmdb(tmp_path, rounds=20, seed=2)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_redis_corruption_rounds(tmp_path: Path, redis_server: RedisServer) -> None:
    run_redis(tmp_path, redis_server, rounds=20, seed=2)
