"""Dependency faults: Redis killed, paused and restarted under a live daemon; a full disk.

The daemon must keep serving from the tiers it still has, count what it could
not read (``kvstore_tier_misses_total{tier,reason}``), never return wrong
bytes, and recover by itself once the dependency is back. A slow disk is a
loop device whose writes a blkio cgroup throttles (root and cgroup v1 blkio
needed, else skipped with the reason).
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from kvstore.client import Client
from kvstore.errors import Busy
from kvstore.keys import Namespace
from tests.redis_servers import RedisServer
from tests.resilience.common import (
    CHUNK,
    TENANT_TOKENS,
    client,
    daemon,
    key_of,
    misses,
    payload,
    record,
    tier_stats,
    verify_all,
)
from tests.service.daemon_fixtures import ADMIN_TOKEN, DaemonProc, namespace, running
from tests.service.dataplane_fixtures import wait_until

TOKEN_A = TENANT_TOKENS["tenant-a"]


def _put(c: Client, ns: Namespace, tag: str, n: int) -> list[bytes]:
    keys = [key_of(tag, i) for i in range(n)]
    assert all(c.put_many(ns, keys, [payload(k) for k in keys]))
    return list(keys)


def _only_in_redis(d: DaemonProc, c: Client, ns: Namespace, tag: str, n: int = 32) -> list[bytes]:
    """Chunks written through to Redis, then dropped from the CPU tier."""
    keys = _put(c, ns, tag, n)
    d.wait_idle(ADMIN_TOKEN)
    r = d.call("POST", "/v1/evict", {"namespace": ns.id.hex(), "tier": "cpu"}, TOKEN_A)
    assert r.status == 200, r
    return keys


def _readable(c: Client, ns: Namespace, keys: list[bytes]) -> bool:
    returned, _ = verify_all(c, ns, keys)  # wrong bytes fail the test here
    return returned == len(keys)


@pytest.fixture
def with_redis(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[DaemonProc, RedisServer]]:
    d = daemon(tmp_path, "--no-disk", "--redis-url", redis_server.url)
    for up in running(d):
        yield up, redis_server


def test_redis_killed_paused_restarted(with_redis: tuple[DaemonProc, RedisServer]) -> None:
    d, redis = with_redis
    faults = held = 0
    with client(d) as c:
        ns = c.register(namespace("tenant-a"))
        # -- killed: redis-only chunks miss (remote_down), CPU chunks are still served, puts still work
        remote = _only_in_redis(d, c, ns, "r1")
        local = _put(c, ns, "local", 16)
        before = misses(d, "redis", "remote_down")
        redis.kill()
        faults += 1
        assert verify_all(c, ns, remote) == (0, len(remote))
        assert _readable(c, ns, local) and _put(c, ns, "during-kill", 8)
        assert misses(d, "redis", "remote_down") > before
        assert d.call("GET", "/readyz").status == 503
        # -- restarted (empty): the daemon reconnects by itself
        redis.start()
        assert wait_until(lambda: d.call("GET", "/readyz").status == 200, 20), "readyz never recovered"
        back = _only_in_redis(d, c, ns, "r2")
        assert _readable(c, ns, back), "chunks written after Redis came back are not served from it"
        held += 1
        # -- paused: reads of redis-only chunks end as misses within the socket timeout
        paused = _only_in_redis(d, c, ns, "r3")
        local = _put(c, ns, "local-2", 16)
        redis.pause()
        faults += 1
        try:
            t0 = time.monotonic()
            assert verify_all(c, ns, paused[:4]) == (0, 4)
            stalled = time.monotonic() - t0
            assert stalled < 15, f"a paused Redis stalled reads for {stalled:.1f} s"
            t0 = time.monotonic()
            assert _readable(c, ns, local) and time.monotonic() - t0 < 2, "CPU hits waited on Redis"
        finally:
            redis.resume()
        assert wait_until(lambda: _readable(c, ns, paused), 20), "reads from Redis did not recover"
        held += 1
    record("dependency", "Redis SIGKILL, restart (empty) and SIGSTOP/SIGCONT under a live daemon",
           faults, held, "CPU hits served throughout, misses counted as remote_down, recovery without restart")


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (as tests/tiers/test_disk.py): real ENOSPC."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_keeps_serving(tmp_path: Path, tiny_fs: Path) -> None:
    ballast = tiny_fs / "ballast"  # another user of the file system; removing it is the operator's fix
    flags = ("--disk-bytes", "16MiB", "--disk-sync", "commit", "--cpu-bytes", "512KiB")
    d = daemon(tmp_path, *flags, data_dir=tiny_fs / "data")
    with open(ballast, "wb", buffering=0) as other:
        other.write(bytes(768 << 10))
        for up in running(d):
            with client(up) as c:
                ns = c.register(namespace("tenant-a"))
                keys: list[bytes] = []
                for n in range(40):  # 40 x 64 x 2 KiB = 5 MiB into what is left of 2 MiB
                    keys += _put(c, ns, f"fill-{n}", 64)
                    up.wait_idle(ADMIN_TOKEN)
                    if tier_stats(up, "disk")["rejected"] > 0:
                        break
                disk = tier_stats(up, "disk")
                assert disk["rejected"] > 0, f"the disk never filled: {disk}"
                _fill(other)  # not one free block left on the file system
                assert c.ping() >= 0 and _put(c, ns, "after-full", 8)
                returned, _ = verify_all(c, ns, keys)  # whatever is served is right
                assert returned > 0 and misses(up, "disk", "corrupt") == 0
                # the disk can be cleared although full (its reserve), and takes chunks in the pages freed
                r = up.call("POST", "/v1/clear", {"namespace": ns.id.hex()}, TOKEN_A)
                assert r.status == 200 and r.json()["removed"] > 0, r
                assert tier_stats(up, "disk")["entries"] == 0
                puts = tier_stats(up, "disk")["puts"]
                inside = _put(c, ns, "after-clear", 32)
                up.wait_idle(ADMIN_TOKEN)
                assert tier_stats(up, "disk")["puts"] > puts, "a cleared full disk took nothing"
                _evict_cpu(up, ns)
                assert _readable(c, ns, inside[-8:]), "chunks written after the clear are not served from disk"
                # space comes back on the file system: the daemon goes on writing to disk by itself
                ballast.unlink()
                puts = tier_stats(up, "disk")["puts"]
                again = _put(c, ns, "after-free", 32)
                up.wait_idle(ADMIN_TOKEN)
                assert tier_stats(up, "disk")["puts"] > puts, "the disk tier took nothing after space was freed"
                _evict_cpu(up, ns)
                assert _readable(c, ns, again[-8:]), "chunks written after ENOSPC are not served from disk"
    record("dependency", "disk full (2 MiB tmpfs, real ENOSPC) under a live daemon", 1, 1,
           "disk puts rejected, CPU tier still serving; CLEAR commits on the full disk (reserve) and the "
           "freed pages take new chunks; disk accepts again once space is freed")


def _fill(f: BinaryIO) -> None:
    """Write to ``f`` (unbuffered) until the file system has no block left."""
    try:
        while True:
            f.write(bytes(4096))
    except OSError:
        pass


def _evict_cpu(d: DaemonProc, ns: Namespace) -> None:
    r = d.call("POST", "/v1/evict", {"namespace": ns.id.hex(), "tier": "cpu"}, TOKEN_A)
    assert r.status == 200, r


@pytest.fixture
def slow_fs(tmp_path: Path) -> Iterator[tuple[Path, Path, str]]:
    """An ext4 file system on a loop device and a blkio cgroup that throttles writes to it.

    Yields (mount point, cgroup directory, "major:minor" of the loop device). A
    process moved into the cgroup has its writes to that device held to the
    rate written into ``blkio.throttle.*`` (cgroup v1): a real slow disk.
    """
    cgroot = Path("/sys/fs/cgroup/blkio")
    if not (cgroot / "blkio.throttle.write_bps_device").exists():
        pytest.skip("no cgroup v1 blkio throttling here")
    img, mnt = tmp_path / "slow.img", tmp_path / "slow"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(96 << 20)
    steps = [["mkfs.ext4", "-q", "-F", str(img)], ["losetup", "-f", "--show", str(img)]]
    out = [subprocess.run(cmd, capture_output=True, text=True, check=False) for cmd in steps[:1]]
    if out[0].returncode != 0:
        pytest.skip(f"cannot make an ext4 image: {out[0].stderr.strip()}")
    loop = subprocess.run(steps[1], capture_output=True, text=True, check=False)
    if loop.returncode != 0:
        pytest.skip(f"cannot attach a loop device (needs root): {loop.stderr.strip()}")
    dev = loop.stdout.strip()
    cg = cgroot / f"kvstore-slow-{mnt.stat().st_ino}"
    try:
        if subprocess.run(["mount", dev, str(mnt)], check=False).returncode != 0:
            pytest.skip("cannot mount the loop device")
        cg.mkdir()
        st = os.stat(dev)
        yield mnt, cg, f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    finally:
        if cg.exists():
            for pid in (cg / "cgroup.procs").read_text().split():
                (cgroot / "cgroup.procs").write_text(pid)
            cg.rmdir()
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        subprocess.run(["losetup", "-d", dev], check=False)


def _writer(w: Client, ns: Namespace, stop: threading.Event, put_s: list[float], busy: list[int]) -> None:
    """Put batches of 16 new chunks until ``stop``; each put's seconds into ``put_s``, BUSY replies counted."""
    n = 0
    while not stop.is_set():
        keys = [key_of("slow", n + i) for i in range(16)]
        t0 = time.monotonic()
        try:
            w.put_many(ns, keys, [payload(k) for k in keys])
            n += 16
        except Busy:  # the write-through queue stayed full: backpressure, not a hang
            busy[0] += 1
            time.sleep(0.05)
        put_s.append(time.monotonic() - t0)


def _throttle(cg: Path, dev: str, bps: int, iops: int) -> None:
    (cg / "blkio.throttle.write_bps_device").write_text(f"{dev} {bps}")
    (cg / "blkio.throttle.write_iops_device").write_text(f"{dev} {iops}")


def test_slow_disk_keeps_cpu_hits_fast(tmp_path: Path, slow_fs: tuple[Path, Path, str]) -> None:
    """Writes to the disk tier's device held to 64 KiB/s and 4 IOPS (blkio throttle on a loop device).

    Every commit fsyncs (``--disk-sync commit``), so the disk tier's writer
    waits on the device. CPU-tier hits must not wait on it; puts either
    succeed or come back within the queue timeout (the write queue pushes
    back, then drops and counts); after the throttle is lifted the disk tier
    catches up by itself.
    """
    mnt, cg, dev = slow_fs
    timeout_s = 1.0
    d = daemon(tmp_path, "--disk-bytes", "32MiB", "--disk-sync", "commit", "--cpu-bytes", "8MiB",
               data_dir=mnt / "data")
    d.env["KVSTORE_QUEUE_TIMEOUT_S"] = str(timeout_s)
    d.env["KVSTORE_QUEUE_DEPTH"] = "16"
    for up in running(d):
        assert up.proc is not None
        with client(up) as c, client(up) as w:
            ns = c.register(namespace("tenant-a"))
            hot = _put(c, ns, "hot", 64)
            up.wait_idle(ADMIN_TOKEN)
            lease = c.lookup(ns, keys=hot, ttl_s=120).lease  # the hot chunks stay in the CPU tier
            assert lease is not None
            (cg / "cgroup.procs").write_text(str(up.proc.pid))
            _throttle(cg, dev, 64 << 10, 4)
            put_s: list[float] = []
            busy = [0]
            stop = threading.Event()

            th = threading.Thread(target=_writer, args=(w, ns, stop, put_s, busy))
            th.start()
            get_s: list[float] = []
            try:
                t_end = time.monotonic() + 8
                while time.monotonic() < t_end:
                    part = random.sample(hot, 8)
                    outs = [bytearray(CHUNK) for _ in part]
                    t0 = time.monotonic()
                    sizes = c.get_many(ns, part, outs, lease=lease)
                    get_s.append(time.monotonic() - t0)
                    assert all(n == CHUNK for n in sizes), "a hot chunk missed while the disk was slow"
                    assert all(bytes(o) == payload(k) for o, k in zip(outs, part))
                    time.sleep(0.02)
            finally:
                stop.set()
                th.join(60)
            dropped = up.call("GET", "/v1/stats", token=ADMIN_TOKEN).json()["writer"]["dropped"]
            p99 = sorted(get_s)[int(len(get_s) * 0.99)]
            assert busy[0] > 0, f"the slow disk never pushed back (dropped {dropped})"
            assert p99 < 0.5 and max(get_s) < 2, f"CPU hits waited on the slow disk: p99 {p99:.3f} s"
            assert put_s and max(put_s) < timeout_s * 3 + 2, f"a put waited {max(put_s):.1f} s on the slow disk"
            # the throttle is lifted: the disk tier catches up without a restart
            _throttle(cg, dev, 0, 0)
            up.wait_idle(ADMIN_TOKEN, timeout=60)
            puts = tier_stats(up, "disk")["puts"]
            later = _put(c, ns, "after-slow", 16)
            up.wait_idle(ADMIN_TOKEN)
            assert tier_stats(up, "disk")["puts"] >= puts + len(later)
            c.release(lease)
    record("dependency", "slow disk (blkio throttle of a loop device: 64 KiB/s, 4 IOPS, fsync per commit)", 1, 1,
           f"CPU hits p99 {p99 * 1e3:.0f} ms (max {max(get_s) * 1e3:.0f} ms) over {len(get_s)} reads; "
           f"{len(put_s)} puts of 16 chunks, {busy[0]} answered BUSY (write queue full for the "
           f"queue timeout, {timeout_s:.0f} s), p50 "
           f"{sorted(put_s)[len(put_s) // 2] * 1e3:.0f} ms, max {max(put_s) * 1e3:.0f} ms; {dropped} disk "
           "writes dropped and counted; disk tier caught up once unthrottled")


def test_put_into_a_top_tier_pinned_by_slow_writes_is_busy_then_stored(
    tmp_path: Path, slow_fs: tuple[Path, Path, str]
) -> None:
    """A 1 MiB CPU tier over a disk tier throttled to 64 KiB/s: 256 KiB chunks put one by one.

    Each chunk stays pinned in the CPU tier until its write to the slow disk
    is done, so the fifth finds no room. The daemon must answer BUSY (room
    comes back by itself), not "not stored"; nothing is lost, and once the
    disk keeps up the same puts store every chunk.
    """
    mnt, cg, dev = slow_fs
    big = 256 << 10
    d = daemon(tmp_path, "--disk-bytes", "32MiB", "--disk-sync", "commit", "--cpu-bytes", "1MiB",
               data_dir=mnt / "data")
    for up in running(d):
        assert up.proc is not None
        with client(up) as c:  # no retries: the first BUSY comes back to the test
            ns = c.register(namespace("tenant-a"))
            (cg / "cgroup.procs").write_text(str(up.proc.pid))
            _throttle(cg, dev, 64 << 10, 4)
            keys = [key_of("pinned", i) for i in range(6)]
            stored = 0
            with pytest.raises(Busy, match="still being written to the lower tiers"):
                for key in keys:
                    assert c.put(ns, key, payload(key, big)), "refused instead of BUSY"
                    stored += 1
            assert stored == 4  # the four that fit
            _throttle(cg, dev, 0, 0)
            up.wait_idle(ADMIN_TOKEN, timeout=60)
            for key in keys:
                assert c.put(ns, key, payload(key, big))
            up.wait_idle(ADMIN_TOKEN, timeout=60)
            for key in keys:
                out = bytearray(big)
                assert c.get(ns, key, out) == big and bytes(out) == payload(key, big)
