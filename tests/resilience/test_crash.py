"""Crash and restart: SIGKILL the whole daemon at random points during heavy writes.

After every kill the daemon restarts on the same data directory; the disk tier
must open, every chunk it lists must read back byte-exact (its bytes are a
function of its key), no read may find a torn chunk (corrupt misses stay 0),
and the disk and CPU tiers stay within their budgets. The fast run kills 3
times; ``-m slow`` kills 50 times.
"""

from __future__ import annotations

import random
import signal
import threading
from pathlib import Path

import pytest

from kvstore.errors import KVStoreError
from tests.resilience.common import client, daemon, key_of, misses, payload, record, tier_stats, verify_all
from tests.service.daemon_fixtures import DaemonProc, namespace

DISK_BUDGET = 1 << 20
FLAGS = ("--cpu-bytes", "1MiB", "--disk-bytes", "1MiB")


def _writer(d: DaemonProc, tag: str, stop: threading.Event, acked: list[int]) -> None:
    """Put batches of 32 chunks until the daemon dies (or ``stop``)."""
    try:
        with client(d) as c:
            ns = c.register(namespace("tenant-a"))
            i = 0
            while not stop.is_set():
                keys = [key_of(tag, i + j) for j in range(32)]
                c.put_many(ns, keys, [payload(k) for k in keys])
                i += 32
                acked.append(i)
    except (KVStoreError, OSError):
        pass  # the daemon was killed under us: expected


def _crash_once(d: DaemonProc, tag: str, rng: random.Random) -> int:
    """Start, write hard, SIGKILL at a random moment; returns how many chunks were acknowledged."""
    d.start()
    stop, acked = threading.Event(), [0]
    writer = threading.Thread(target=_writer, args=(d, tag, stop, acked), daemon=True)
    writer.start()
    stop.wait(rng.uniform(0.3, 2.0))
    d.stop(signal.SIGKILL)
    stop.set()
    writer.join(30)
    return acked[-1]


def _check_after_restart(d: DaemonProc) -> tuple[int, int]:
    """Restart and verify every listed chunk; returns (chunks verified, on-disk bytes)."""
    d.start()
    try:
        with client(d) as c:
            ns = c.register(namespace("tenant-a"))
            keys = c.list_keys(ns, limit=65536)
            returned, missed = verify_all(c, ns, keys)
        assert missed == 0, f"{missed} of {len(keys)} listed chunks could not be read back"
        disk = tier_stats(d, "disk")
        assert misses(d, "disk", "corrupt") == 0, "a torn or corrupt chunk after SIGKILL"
        assert disk["used_bytes"] <= DISK_BUDGET and tier_stats(d, "cpu")["used_bytes"] <= 1 << 20
        return returned, int(disk["used_bytes"])
    finally:
        d.stop()


def run_crashes(tmp_path: Path, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    d = daemon(tmp_path, *FLAGS, data_dir=tmp_path / "data")
    held = verified = acked = 0
    try:
        for n in range(kills):
            acked += _crash_once(d, f"crash-{seed}-{n}", rng)
            got, _ = _check_after_restart(d)
            verified += got
            held += 1
    finally:
        d.kill()
        record("crash", "SIGKILL of the daemon during heavy writes, restart, verify disk tier", kills, held,
               f"{acked} chunks acknowledged, {verified} chunk reads verified byte-exact, 0 torn")
    assert verified > 0, "no chunk survived any restart: the disk tier kept nothing"


def test_sigkill_during_writes_fast(tmp_path: Path) -> None:
    run_crashes(tmp_path, kills=3, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigkill_during_writes_50(tmp_path: Path) -> None:
    run_crashes(tmp_path, kills=50, seed=2)
