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
