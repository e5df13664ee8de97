"""The LMDB disk tier: round trips, budget, eviction, pins, corruption, crashes, restart, full disks."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lmdb
import numpy as np
import numpy.typing as npt
import pytest
import torch

import kvstore.tiers.disk_open as disk_mod
from kvstore.checksum import checksum
from kvstore.errors import Busy, ChunkTooLarge, DiskFull, InvalidInput, LeaseError
from kvstore.keys import ChunkKey, NamespaceId
from kvstore.tiers.base import ChunkMeta, tier_factory
from kvstore.tiers.disk import DiskTier, DiskTierConfig
from kvstore.tiers.record import HEADER_BYTES
from tests.tiers.disk_child import CAPACITY, MAX_CHUNK, chunk_bytes, chunk_key

CHILD = str(Path(__file__).with_name("disk_child.py"))
NS1 = NamespaceId(b"\x01" * 32)
NS2 = NamespaceId(b"\x02" * 32)
U8 = npt.NDArray[np.uint8]


def k(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(32, "big"))


def blob(i: int, n: int) -> U8:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8)


def meta(data: U8, ns: NamespaceId = NS1) -> ChunkMeta:
    return ChunkMeta(ns, data.size, checksum(data))


def cfg(tmp_path: Path, capacity: int = 4 << 20, max_chunk_bytes: int = 1 << 20, **kw: Any) -> DiskTierConfig:
    return DiskTierConfig(str(tmp_path / "disk"), capacity, max_chunk_bytes=max_chunk_bytes, **kw)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def on_disk(path: str) -> dict[bytes, int]:
    """Key -> header + payload bytes of every record, read with lmdb directly (tier closed)."""
    env = lmdb.open(path, max_dbs=3, readonly=True, lock=False)
    sizes: dict[bytes, int] = {}
    with env.begin() as txn:
        for db in (env.open_db(b"hdr", txn=txn, create=False), env.open_db(b"data", txn=txn, create=False)):
            for key, value in txn.cursor(db=db):
                sizes[key] = sizes.get(key, 0) + len(value)
    env.close()
    return sizes


def metas(t: DiskTier) -> dict[ChunkKey, ChunkMeta | None]:
    return {key: t.meta(key) for key in list(t.keys())}


def indices(t: DiskTier) -> set[int]:
    return {int.from_bytes(key, "big") for key in list(t.keys())}


def tamper(tier: DiskTier, *ops: str) -> None:
    """Corrupt records from another process while ``tier`` has the store open."""
    c = tier.config
    args = [sys.executable, CHILD, "tamper", c.path, str(c.map_size), "1" if c.sync == "none" else "0", *ops]
    subprocess.run(args, check=True, timeout=30)


@pytest.fixture
def tier(tmp_path: Path) -> Iterator[DiskTier]:
    t = DiskTier(cfg(tmp_path))
    yield t
    t.close()


# -- config ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        {"capacity_bytes": 0},
        {"capacity_bytes": HEADER_BYTES},
        {"path": ""},
        {"sync": "always"},
        {"policy": "fifo"},
        {"ttl_s": 5.0},  # only with policy ttl
        {"policy": "ttl", "ttl_s": 0.0},
        {"max_chunk_bytes": 0},
        {"map_size_bytes": 4096},
    ],
)
def test_bad_config_raises_value_error(tmp_path: Path, kw: dict[str, object]) -> None:
    args: dict[str, object] = {"path": str(tmp_path), "capacity_bytes": 1 << 20, **kw}
    with pytest.raises(ValueError):
        DiskTierConfig(**args)  # type: ignore[arg-type]


def test_registered_and_map_size_from_budget(tmp_path: Path) -> None:
    assert tier_factory("disk") is DiskTier
    c = DiskTierConfig(str(tmp_path), 100 << 20, max_chunk_bytes=8 << 20)
    assert c.map_size >= (100 << 20) * 5 // 4 + 4 * (8 << 20) and c.map_size % (1 << 20) == 0
    assert DiskTierConfig(str(tmp_path), 1 << 20, map_size_bytes=3 << 20).map_size == 3 << 20


def test_directory_has_one_owner(tmp_path: Path) -> None:
    with DiskTier(cfg(tmp_path)), pytest.raises(Busy):
        DiskTier(cfg(tmp_path))
    DiskTier(cfg(tmp_path)).close()  # released on close


# -- round trips -------------------------------------------------------------------------
def test_round_trip_numpy_and_torch(tier: DiskTier) -> None:
    a = blob(1, 300_000)
    t = torch.from_numpy(blob(2, 70_001).copy())
    assert tier.put(k(1), a, meta(a))
    assert tier.put(k(2), t, ChunkMeta(NS2, t.numel(), b""))  # checksum computed by the tier
    out = np.zeros(400_000, dtype=np.uint8)
    assert tier.get_into(k(1), out) == a.size and np.array_equal(out[: a.size], a)
    tout = torch.zeros(70_001, dtype=torch.uint8)
    assert tier.get_into(k(2), tout) == t.numel() and torch.equal(tout, t)
    got = tier.read(k(2))
    assert got is not None and np.array_equal(got[0], t.numpy())
    assert got[1] == ChunkMeta(NS2, t.numel(), checksum(t.numpy()))
    assert tier.meta(k(1)) == meta(a) and tier.contains(k(2)) and not tier.contains(k(3))
    assert set(tier.keys()) == {k(1), k(2)} and list(tier.keys(NS2)) == [k(2)]
    assert tier.get_into(k(3), out) is None and tier.get_into(k(1), np.zeros(10, np.uint8)) is None
    s = tier.stats()
    assert (s.hits, s.misses["absent"], s.misses["too_small"], s.entries) == (3, 1, 1, 2)
    assert s.used_bytes == 2 * HEADER_BYTES + a.size + t.numel()


def test_put_validation(tier: DiskTier) -> None:
    a = blob(1, 1000)
    with pytest.raises(InvalidInput):
        tier.put(ChunkKey(b"short"), a, meta(a))
    with pytest.raises(InvalidInput):
        tier.put(k(1), a, ChunkMeta(NS1, 999, b""))
    with pytest.raises(InvalidInput):
        tier.put(k(1), a, ChunkMeta(NS1, a.size, b"short"))
    big = np.zeros((1 << 20) + 1, dtype=np.uint8)
    with pytest.raises(ChunkTooLarge):
        tier.put(k(1), big, meta(big))
    assert tier.stats().entries == 0


def test_checksum_from_the_source_is_kept_end_to_end(tier: DiskTier) -> None:
    a = blob(1, 1000)
    m = meta(a)
    a[10] ^= 1  # damaged after the source hashed it
    assert tier.put(k(1), a, m)
    assert tier.read(k(1)) is None and tier.stats().misses["corrupt"] == 1 and not tier.contains(k(1))


def test_replace_and_same_content_put(tier: DiskTier) -> None:
    a, b = blob(1, 5000), blob(2, 7000)
    assert tier.put(k(1), a, meta(a)) and tier.put(k(1), a, meta(a))
    assert tier.stats().puts == 1  # same key, same bytes: only touched
    assert tier.put(k(1), b, meta(b))
    got = tier.read(k(1))
    assert got is not None and np.array_equal(got[0], b)
    assert tier.stats().used_bytes == HEADER_BYTES + b.size


# -- budget and eviction -------------------------------------------------------------------
def test_budget_holds_under_churn_and_matches_disk(tmp_path: Path) -> None:
    c = cfg(tmp_path, capacity=2 << 20, max_chunk_bytes=256 << 10)
    rng = random.Random(3)
    evicted: list[ChunkKey] = []
    with DiskTier(c) as t:
        t.add_evict_listener(lambda key, m, d: evicted.append(key))
        for step in range(400):
            i = rng.randrange(60)
            if rng.random() < 0.1:
                t.delete(k(i))
            else:
                data = blob(step, rng.randint(1, 256 << 10))
                assert t.put(k(i), data, meta(data))
            s = t.stats()
            assert s.used_bytes <= s.capacity_bytes
        s = t.stats()
        held = metas(t)
    assert s.evictions == len(evicted) > 0
    sizes = on_disk(c.path)
    assert set(sizes) == set(held)  # no orphans, nothing missing
    assert sum(sizes.values()) == s.used_bytes == sum(HEADER_BYTES + m.nbytes for m in held.values() if m)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_eviction_follows_policy(tmp_path: Path, policy: str) -> None:
    n = 100_000
    with DiskTier(cfg(tmp_path, capacity=3 * (n + HEADER_BYTES), policy=policy)) as t:
        evicted: list[ChunkKey] = []
        t.add_evict_listener(lambda key, m, d: evicted.append(key))
        for i in range(3):
            t.put(k(i), blob(i, n), meta(blob(i, n)))
        out = np.empty(n, np.uint8)
        for i in (0, 0, 2, 1):  # lru order: 0, 2, 1 -> victim 0; lfu counts: 0:3, 1:2, 2:2 -> victim 2
            assert t.get_into(k(i), out) == n
        t.put(k(9), blob(9, n), meta(blob(9, n)))
        assert evicted == ([k(0)] if policy == "lru" else [k(2)])
        assert t.get_into(evicted[0], out) is None and t.stats().misses["evicted"] == 1


def test_ttl_expiry(tmp_path: Path) -> None:
    clock = Clock()
    with DiskTier(cfg(tmp_path, policy="ttl", ttl_s=10.0), clock=clock) as t:
        gone: list[ChunkKey] = []
        t.add_evict_listener(lambda key, m, d: gone.append(key))
        a = blob(1, 1000)
        t.put(k(1), a, meta(a))
        clock.t += 5
        t.put(k(2), a, meta(a))
        clock.t += 6
        assert t.get_into(k(1), np.empty(1000, np.uint8)) is None
        assert t.stats().misses["expired"] == 1 and gone == [k(1)] and list(t.keys()) == [k(2)]


# -- pins --------------------------------------------------------------------------------
def test_pins(tmp_path: Path) -> None:
    n = 100_000
    with DiskTier(cfg(tmp_path, capacity=2 * (n + HEADER_BYTES))) as t:
        for i in range(2):
            t.put(k(i), blob(i, n), meta(blob(i, n)))
        assert t.pin(k(0)) and t.pin(k(0)) and not t.pin(k(7))
        t.put(k(2), blob(2, n), meta(blob(2, n)))  # evicts 1, never the pinned 0
        assert t.contains(k(0)) and not t.contains(k(1))
        assert t.pin(k(2))
        assert not t.put(k(3), blob(3, n), meta(blob(3, n)))  # everything pinned: rejected, not raised
        assert t.stats().rejected == 1
        assert t.delete(k(0)) and not t.delete(k(0))  # pinned: marked, still readable
        assert k(0) not in list(t.keys()) and not t.pin(k(0))
        assert t.get_into(k(0), np.empty(n, np.uint8)) == n
        t.unpin(k(0))
        assert t.contains(k(0))
        t.unpin(k(0))  # the last pin removes it
        assert not t.contains(k(0)) and t.stats().used_bytes == n + HEADER_BYTES
        with pytest.raises(LeaseError):
            t.unpin(k(0))
        t.unpin(k(2))
        with pytest.raises(LeaseError):
            t.unpin(k(2))


def test_clear_by_namespace(tier: DiskTier) -> None:
    for i in range(6):
        a = blob(i, 2000)
        tier.put(k(i), a, meta(a, NS1 if i % 2 else NS2))
    assert tier.pin(k(1))
    assert tier.clear(NS1) == 3
    assert sorted(tier.keys()) == [k(0), k(2), k(4)] and tier.contains(k(1))
    tier.unpin(k(1))
    assert not tier.contains(k(1)) and tier.clear() == 3 and tier.stats().used_bytes == 0


# -- corruption ----------------------------------------------------------------------------
def test_corruption_while_open_is_a_counted_miss(tier: DiskTier) -> None:
    n = 50_000
    for i in range(6):
        tier.put(k(i), blob(i, n), meta(blob(i, n)))
    tamper(
        tier,
        f"flip:{k(0).hex()}:data:{n // 2}",  # a payload byte
        f"flip:{k(1).hex()}:hdr:70",  # a header byte (inside the namespace id)
        f"truncate:{k(2).hex()}:{n - 1}",
        f"copy:{k(5).hex()}:{k(3).hex()}",  # a record under another key
        f"drop:{k(4).hex()}:data",  # a header without its payload
    )
    out = np.full(n, 7, dtype=np.uint8)
    for i in range(5):
        assert tier.get_into(k(i), out) is None
        assert not tier.contains(k(i))
    assert not out.any()  # the bad bytes copied for the checksum were wiped
    assert tier.get_into(k(0), out) is None  # a second read: remembered as corrupt
    s = tier.stats()
    assert s.misses["corrupt"] == 6 and s.entries == 1 and s.used_bytes == n + HEADER_BYTES
    assert tier.get_into(k(5), out) == n and np.array_equal(out, blob(5, n))
    path = tier.config.path
    tier.close()
    assert set(on_disk(path)) == {k(5)}  # the corrupt records were deleted


def test_restart_rebuilds_index_from_headers(tmp_path: Path) -> None:
    c = cfg(tmp_path, capacity=8 << 20)
    with DiskTier(c) as t:
        for i in range(20):
            a = blob(i, 1000 + 5000 * i)
            t.put(k(i), a, meta(a, NS1 if i % 3 else NS2))
        before = metas(t)
        stats = t.stats()
        ns2 = set(t.keys(NS2))
    env = lmdb.open(c.path, max_dbs=3, map_size=c.map_size, writemap=True)
    with env.begin(write=True) as txn:  # corrupt every payload: a header-only rebuild cannot notice
        data = env.open_db(b"data", txn=txn)
        for key, value in list(txn.cursor(db=data)):
            txn.put(key, bytes(value[:-1]) + bytes([value[-1] ^ 1]), db=data)
    env.close()
    with DiskTier(c) as t:
        r = t.last_rebuild
        assert (r.entries, r.used_bytes, r.dropped, r.wiped) == (20, stats.used_bytes, 0, False)
        assert metas(t) == before and set(t.keys(NS2)) == ns2
        assert t.stats().entries == 20
        assert t.read(k(3)) is None and t.stats().misses["corrupt"] == 1  # caught on read


def test_corruption_found_at_restart(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    with DiskTier(c) as t:
        for i in range(5):
            t.put(k(i), blob(i, 9000), meta(blob(i, 9000)))
    env = lmdb.open(c.path, max_dbs=3, map_size=c.map_size, writemap=True)
    hdr, data = env.open_db(b"hdr"), env.open_db(b"data")
    with env.begin(write=True) as txn:
        txn.put(k(0), (txn.get(k(0), db=data) or b"")[:100], db=data)  # truncated
        for db in (hdr, data):
            txn.put(k(1), txn.get(k(4), db=db) or b"", db=db)  # k(4)'s record under k(1)
        txn.delete(k(2), db=hdr)  # an orphaned payload
    env.close()
    with DiskTier(c) as t:  # a record under another key and an orphaned payload go at open
        assert t.last_rebuild.dropped == 2 and sorted(t.keys()) == [k(0), k(3), k(4)]
        for i in range(3):  # the truncated payload is caught by its read
            assert t.get_into(k(i), np.empty(9000, np.uint8)) is None
        assert t.stats().misses["corrupt"] == 3 and t.stats().used_bytes == 2 * (9000 + HEADER_BYTES)
    assert set(on_disk(c.path)) == {k(3), k(4)}


# -- crashes and restarts ------------------------------------------------------------------
def test_sigkill_mid_batch_leaves_no_torn_chunk(tmp_path: Path) -> None:
    path = str(tmp_path / "crash")
    rng = random.Random(11)
    seen = 0
    for rep in range(4):
        sync: Literal["none", "commit"] = "commit" if rep % 2 else "none"
        child = subprocess.Popen([sys.executable, CHILD, "write", path, sync, str(rep * 1_000_000)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            threading.Event().wait(rng.uniform(0.02, 0.4))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        with DiskTier(DiskTierConfig(path, CAPACITY, sync=sync, max_chunk_bytes=MAX_CHUNK)) as t:
            assert t.last_rebuild.dropped == 0
            keys = list(t.keys())
            for key in keys:
                got = t.read(key)
                assert got is not None, "a torn or corrupt chunk"
                assert np.array_equal(got[0], chunk_bytes(int.from_bytes(key[16:], "big")))
                assert chunk_key(int.from_bytes(key[16:], "big")) == key
            assert t.stats().misses["corrupt"] == 0 and t.stats().used_bytes <= CAPACITY
            seen += len(keys)
    assert seen > 0


def test_reboot_with_sync_none_empties_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = cfg(tmp_path)
    a = blob(1, 1000)
    cases: list[tuple[Literal["none", "commit"], str, bool]] = [
        ("none", "boot-A", True),  # a killed process, same boot: kept
        ("commit", "boot-B", True),  # synced commits survive a reboot
        ("none", "boot-B", False),  # open without fsync across a reboot: emptied
    ]
    for sync, boot_after, survives in cases:
        monkeypatch.setattr(disk_mod, "_boot_id", lambda: "boot-A")
        with DiskTier(DiskTierConfig(c.path, c.capacity_bytes, sync=sync)) as t:
            t.put(k(1), a, meta(a))
        Path(c.path, "session").write_text(f"open boot-A {sync}\n")  # as if it never closed
        monkeypatch.setattr(disk_mod, "_boot_id", lambda boot=boot_after: boot)
        with DiskTier(c) as t:
            assert t.contains(k(1)) is survives and t.last_rebuild.wiped is not survives


# -- full map, full disk -------------------------------------------------------------------
def _fill_until_full(t: DiskTier, n: int, count: int) -> set[int]:
    gone: set[ChunkKey] = set()
    t.add_evict_listener(lambda key, m, d: gone.add(key))
    stored = set()
    for i in range(count):
        if t.put(k(i), blob(i, n), meta(blob(i, n))):  # never raises
            stored.add(i)
    held = {i for i in stored if k(i) not in gone}
    assert indices(t) == held  # nothing lost that was not announced
    out = np.empty(n, np.uint8)
    for i in held:
        assert t.get_into(k(i), out) == n and np.array_equal(out, blob(i, n))
    return held


def test_map_full_evicts_or_rejects_never_raises(tmp_path: Path) -> None:
    c = cfg(tmp_path, capacity=64 << 20, map_size_bytes=1 << 20)
    with DiskTier(c) as t:
        held = _fill_until_full(t, 100_000, 40)
        s = t.stats()
        assert s.rejected + s.evictions > 0 and len(held) >= 2 and s.used_bytes < 1 << 20
    assert sum(on_disk(c.path).values()) == s.used_bytes


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)]
    r = subprocess.run(mount, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_enospc(tiny_fs: Path) -> None:
    path = str(tiny_fs / "store")
    with pytest.raises(DiskFull):  # sync="none" reserves the whole map at open: too big for 2 MiB
        DiskTier(DiskTierConfig(path, 16 << 20, max_chunk_bytes=256 << 10))
    c = DiskTierConfig(path, 16 << 20, sync="commit", max_chunk_bytes=256 << 10)
    with DiskTier(c) as t:  # sync="commit" writes through the file: ENOSPC arrives at a commit
        held = _fill_until_full(t, 200_000, 30)
        s = t.stats()
        assert s.rejected + s.evictions > 0 and held
    with DiskTier(c) as t:
        assert indices(t) == held and t.last_rebuild.dropped == 0


# -- threads -------------------------------------------------------------------------------
def test_writer_thread_and_readers(tmp_path: Path) -> None:
    tier = DiskTier(cfg(tmp_path, capacity=1 << 20))  # room for ~25 of the 40 keys: evictions all along
    n, stop, errors = 40_000, threading.Event(), []

    def writer() -> None:
        for step in range(300):
            i = (step * 7) % 40
            tier.put(k(i), blob(i, n + i), meta(blob(i, n + i)))
        stop.set()

    def reader(seed: int) -> None:
        rng, out = random.Random(seed), np.empty(n + 64, np.uint8)
        try:
            while not stop.is_set():
                i = rng.randrange(40)
                if tier.pin(k(i)):
                    got = tier.get_into(k(i), out)
                    tier.unpin(k(i))
                    assert got == n + i and np.array_equal(out[:got], blob(i, got))
        except Exception as exc:  # noqa: BLE001  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=writer)]
    threads += [threading.Thread(target=reader, args=(seed,)) for seed in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    s = tier.stats()
    tier.close()
    assert not errors and s.misses["corrupt"] == 0 and s.evictions > 0 and s.hits > 0
    assert s.used_bytes <= s.capacity_bytes
