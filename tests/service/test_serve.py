"""`kvstore serve` as the README runs it: defaults, environment, config file, and a clean failure."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.redis_servers import free_port
from tests.service.daemon_fixtures import DaemonProc, call

SERVE = [sys.executable, "-m", "kvstore.cli", "serve"]


def test_readme_command_with_settings_from_the_environment(tmp_path: Path) -> None:
    admin, port = free_port(), free_port()
    env = {
        **os.environ,
        "KVSTORE_ADMIN_PORT": str(admin),
        "KVSTORE_PORT": str(port),
        "KVSTORE_CPU_BYTES": "16MiB",
        "KVSTORE_DISK_BYTES": "64MiB",
        "KVSTORE_LOG_LEVEL": "warning",
    }
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen(
            [*SERVE, "--data-dir", "./kvstore-data"], cwd=tmp_path, env=env, stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "log").read_text()
            try:
                if call(admin, "GET", "/readyz", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the daemon did not become ready"
            time.sleep(0.05)
        config = call(admin, "GET", "/v1/config").json()
        assert config["tiers"]["cpu_bytes"] == 16 << 20 and config["tiers"]["data_dir"] == "./kvstore-data"
        assert config["admin"]["port"] == admin and config["data_plane"]["port"] == port
        stats = call(admin, "GET", "/v1/stats").json()
        assert [t["name"] for t in stats["tiers"]] == ["cpu", "disk"]
        assert (tmp_path / "kvstore-data").is_dir()
        # without tokens only loopback Host names are served (a page rebinding its name to 127.0.0.1 is refused)
        assert call(admin, "GET", "/v1/stats", headers={"Host": f"evil.example:{admin}"}).status == 403
        assert call(admin, "GET", "/v1/stats", headers={"Host": f"localhost:{admin}"}).status == 200
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    log_lines = (tmp_path / "log").read_text().splitlines()
    assert all(json.loads(line)["level"] in ("warning", "error") for line in log_lines)  # level from the env


def test_print_config_reads_the_file_and_redacts(tmp_path: Path) -> None:
    cfg = tmp_path / "kvstore.toml"
    cfg.write_text(
        '[tiers]\ncpu_bytes = "2GiB"\nredis_url = "redis://:s3cret@10.0.0.5:6379/0"\n[admin]\nport = 9100\n'
    )
    out = subprocess.run(
        [*SERVE, "--config", str(cfg), "--print-config", "--admin-port", "9200"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    assert config["tiers"]["cpu_bytes"] == 2 << 30 and config["admin"]["port"] == 9200
    assert "s3cret" not in out.stdout and "***" in config["tiers"]["redis_url"]
    cfg.write_text("[tiers]\ncpu_bites = 1\n")
    out = subprocess.run(
        [*SERVE, "--config", str(cfg)], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "tiers.cpu_bites" in out.stderr


def test_a_busy_port_fails_cleanly_closing_what_was_opened(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        d = DaemonProc(tmp_path, args=["--admin-port", str(busy.getsockname()[1])])
        out = subprocess.run(d.argv, check=False, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 1 and "error" in out.stderr
    msgs = [json.loads(line)["msg"] for line in out.stderr.splitlines() if line.startswith("{")]
    assert msgs.index("store open") < msgs.index("store closed") < msgs.index("failed")
