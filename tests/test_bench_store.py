"""`kvstore bench store` end to end: a tiny run as a real process, its JSON line checked.

Not a timed test: it checks that every measurement ran and reported a
positive finite figure, that the private redis-server the benchmark started
is gone afterwards, and that the temporary directories were removed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.redis_servers import RedisServer

REPO = Path(__file__).resolve().parents[1]

BASE_KEYS = (
    "memcpy_mbps", "cpu_put_mbps", "cpu_get_mbps", "cpu_put_vs_memcpy", "cpu_get_vs_memcpy",
    "file_write_mbps", "file_read_mbps", "disk_put_mbps", "disk_get_mbps",
    "disk_put_vs_file", "disk_get_vs_file", "disk_put_vs_file_overwrite", "disk_get_vs_file_mmap",
    "sha256_ms", "lookup_ms", "lookup_nolease_ms", "prefix_keys_ms", "index_probes_ms",
    "lookup_vs_sha256", "lookup_nolease_vs_sha256", "prefix_keys_vs_sha256", "index_probes_vs_sha256",
    "index_bytes_per_chunk", "cpu_tier_meta_bytes_per_chunk",
)  # fmt: skip
REDIS_KEYS = (
    "redispy_set_mbps", "redispy_get_mbps", "redis_put_mbps", "redis_get_mbps",
    "redis_put_vs_redispy", "redis_get_vs_redispy", "redis_put_vs_raw_socket", "redis_get_vs_raw_socket",
    "redis_put_many_mbps", "redis_get_many_mbps", "redis_put_many_vs_redispy", "redis_get_many_vs_redispy",
    "redis_get_many_vs_pipeline",
)  # fmt: skip
QUICK = ["--quick", "--json", "--no-progress", "--chunk-mib", "1", "--iters", "3"]


def _processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def test_quick_run_reports_every_figure_and_cleans_up(tmp_path: Path) -> None:
    has_redis = shutil.which("redis-server") is not None
    argv = [sys.executable, "-m", "kvstore.benchmarks.store", *QUICK, "--index-entries", "5000"]
    argv += ["--meta-entries", "2000", "--prompt-tokens", "131072"]
    if not has_redis:
        argv += ["--skip", "redis"]  # the rest still runs; the redis part is covered where CI installs it
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # every temp dir (disk tier, redis-server) lands here

    proc = subprocess.run(argv, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    values = json.loads(lines[-1])
    for key in BASE_KEYS + (REDIS_KEYS if has_redis else ()):
        value = values.get(key)
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value) and value > 0, (key, value)
    assert values["lookup_chunks"] == 131072 // 256
    assert values["chunk_bytes"] == 1 << 20
    assert any(line.startswith("measurement") for line in lines[:-1])  # the table precedes the JSON
    assert _processes_mentioning(str(tmp_path)) == []  # the private redis-server was stopped
    assert list(tmp_path.iterdir()) == []  # and every temporary directory removed


def test_redis_url_run_leaves_the_callers_redis_as_it_was(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.set("not-the-benchmarks", b"keep me")
    argv = [sys.executable, "bench/store.py", *QUICK, "--redis-url", redis_server.url]
    argv += [f"--skip={s}" for s in ("cpu", "disk", "lookup", "memory")]

    proc = subprocess.run(argv, check=False, cwd=REPO, capture_output=True, text=True, timeout=60)

    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["redis_get_vs_redispy"] > 0
    assert client.keys("*") == [b"not-the-benchmarks"]  # every key the benchmark wrote is gone
