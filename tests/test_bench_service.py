"""`kvstore bench service` end to end: a tiny run as a real process, its JSON line checked.

Not a timed test: it checks that every measurement ran and reported a
positive finite figure, that the lookups had no errors, and that the
processes the benchmark started (data plane, raw-socket peer, redis-server)
and their temporary files are gone afterwards.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = (
    "memcpy_mbps", "socket_get_mbps", "socket_put_mbps", "shm_get_mbps", "shm_put_mbps", "tcp_get_mbps",
    "tcp_put_mbps", "shm_get_vs_memcpy", "shm_put_vs_memcpy", "tcp_get_vs_socket", "tcp_put_vs_socket",
    "lookup_p50_ms", "lookup_p99_ms", "lookup_p99_over_p50",
)  # fmt: skip
REDIS_KEYS = ("redispy_get_mbps", "redispy_set_mbps", "tcp_get_vs_redis", "tcp_put_vs_redis")


def _shm_files() -> set[str]:
    return {p for p in os.listdir("/dev/shm") if p.startswith("kvstore-")} if os.path.isdir("/dev/shm") else set()


def test_quick_run_reports_every_figure_and_cleans_up(tmp_path: Path) -> None:
    has_redis = shutil.which("redis-server") is not None
    argv = [sys.executable, "-m", "kvstore.benchmarks.service", "--quick", "--json", "--no-progress",
            "--chunk-mib", "1", "--iters", "2", "--clients", "4", "--lookups", "5", "--prompt-tokens", "1024"]
    if not has_redis:
        argv += ["--skip", "redis"]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    shm_before = _shm_files()

    proc = subprocess.run(argv, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)

    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    values = json.loads(lines[-1])
    for key in KEYS + (REDIS_KEYS if has_redis else ()):
        value = values.get(key)
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value) and value > 0, (key, value)
    assert values["lookup_errors"] == 0 and values["lookup_clients"] == 4 and values["lookup_chunks"] == 4
    assert values["chunk_bytes"] == 1 << 20
    assert any(line.startswith("measurement") for line in lines[:-1])  # the table precedes the JSON
    assert list(tmp_path.iterdir()) == []  # every temporary directory removed
    assert _shm_files() <= shm_before  # the daemon's shared arena removed with it


SOAK_KEYS = (
    "soak_ops", "soak_hit_chunks", "soak_errors", "soak_wrong_reads", "soak_rss_max_mib", "soak_arena_max_mib",
    "soak_lmdb_max_mib", "soak_overhead_max_mib", "soak_overhead_growth_mib", "soak_cpu_tier_max_mib",
    "soak_disk_tier_max_mib", "soak_op_p99_ms", "soak_leases_after", "soak_passed",
)  # fmt: skip


def _soak(*extra: str) -> tuple[int, dict[str, object], str]:
    argv = [sys.executable, "-m", "kvstore.benchmarks.service", "--soak", "--quick", "--soak-s", "8", "--json",
            "--no-progress", *extra]  # fmt: skip
    shm_before = _shm_files()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert _shm_files() <= shm_before  # the daemon's arena file is gone
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1]), done.stdout


def test_soak_runs_a_real_daemon_under_mixed_load_within_its_budgets() -> None:
    rc, got, out = _soak()
    assert rc == 0, out
    assert set(SOAK_KEYS) <= got.keys()
    assert got["soak_passed"] is True and got["soak_errors"] == 0 and got["soak_wrong_reads"] == 0
    assert got["soak_ops"] > 0 and got["soak_hit_chunks"] > 0  # puts were read back (and checked)
    assert 0 < got["soak_arena_max_mib"] <= 64 + 16 and got["soak_cpu_tier_max_mib"] <= 64
    assert got["soak_disk_tier_max_mib"] <= 128
    assert 0 < got["soak_overhead_max_mib"] <= 256
    assert got["soak_leases_after"] == 0  # every lease of the load was consumed or released


def test_soak_fails_when_the_overhead_bound_is_broken() -> None:
    rc, got, out = _soak("--soak-overhead-mib", "1")  # no Python process fits in 1 MiB
    assert rc == 1 and got["soak_passed"] is False
    assert "FAIL overhead within 1 MiB" in out
